"""`analysis.heap.keep_heap_pad`: glibc keeps the padding it is asked for; elsewhere a no-op."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt(M_TOP_PAD) is glibc's")
def test_glibc_keeps_the_pad_once_per_process():
    # a fresh process: the answer is cached per process, and the setting is process-wide
    code = ("from stm_defects.analysis.heap import keep_heap_pad, _DONE\n"
            "assert keep_heap_pad() is True and _DONE == {'ok': True}\n"
            "assert keep_heap_pad(1) is True\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_glibc_it_does_nothing(monkeypatch):
    from stm_defects.analysis import heap

    monkeypatch.setattr(heap, "_DONE", {})
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.keep_heap_pad() is False
