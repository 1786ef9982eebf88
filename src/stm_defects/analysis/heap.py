"""Keep freed memory in the process between a scan's many temporaries (glibc only).

A scan's analysis makes and drops a few hundred image-sized temporaries (1 MiB each at 512²).
glibc serves them from the heap, and on each free it gives the heap's free top back to the
kernel once that exceeds its trim threshold (about twice the largest block freed so far); the
next temporary then grows the heap again and touches fresh pages, each a page fault and a page
the kernel zeroes. `keep_heap_pad` asks glibc (``mallopt(M_TOP_PAD)``) to keep ``pad`` bytes
beyond what is in use whenever it grows or trims the heap, so those temporaries reuse pages
already mapped. The same 512² scans take about 20% less time (`benchmarks/bench_scaling.py`,
README *Speed*); the results are the same to the bit (only where memory comes from changes),
and the process holds at most ``pad`` more resident memory. glibc's other thresholds keep their
dynamic behaviour (setting the trim or mmap threshold would switch it off, and measured slower).

On a system without glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_heap_pad"]

_M_TOP_PAD = -2          # glibc malloc.h
PAD_BYTES = 64 << 20

_DONE: dict = {}


def keep_heap_pad(pad: int = PAD_BYTES) -> bool:
    """Ask glibc to keep ``pad`` bytes at the top of the heap; True where it did. Once per
    process (later calls return the first answer)."""
    if "ok" in _DONE:
        return _DONE["ok"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_TOP_PAD, int(pad)))   # 1 on success; musl has no mallopt
        except (OSError, AttributeError):
            ok = False
    _DONE["ok"] = ok
    return ok
