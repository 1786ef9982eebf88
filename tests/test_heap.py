"""`analysis.heap.keep_freed_memory`: glibc takes the thresholds; elsewhere a no-op."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_glibc_keeps_the_pad_once_per_process():
    # a fresh process: the answer is cached per process, and the setting is process-wide
    code = ("from stm_defects.analysis.heap import keep_freed_memory, _DONE\n"
            "assert keep_freed_memory() is True and _DONE == {'ok': True}\n"
            "assert keep_freed_memory(1) is True\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_glibc_it_does_nothing(monkeypatch):
    from stm_defects.analysis import heap

    monkeypatch.setattr(heap, "_DONE", {})
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.keep_freed_memory() is False
