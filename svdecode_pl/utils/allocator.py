"""Keep freed tensor memory in the process (glibc), so CPU forward passes stop paying page faults.

glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB to 32 MiB, adapted at run
time) from fresh ``mmap`` pages and unmaps them on ``free``: every activation of a CPU forward
pass (a few MB each) is then page-faulted in again, one 4 KiB page at a time. On this project's
scoring that was a quarter of the CPU time as system time (``benchmarks/truthfulqa_mc.py``).
Raising the mmap and trim thresholds keeps the freed blocks in the heap for the next pass; the
peak memory is unchanged. PyTorch's CPU tuning guide reaches the same end with jemalloc or
tcmalloc through ``LD_PRELOAD``; this needs no extra library and no launcher.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Set to 0 to leave the C allocator as it is.
ENV = "SVDECODE_KEEP_FREED_MEMORY"


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Blocks up to ``threshold`` bytes come from (and return to) the heap, and the heap is not
    trimmed below that size. True if glibc took the settings; a no-op elsewhere (macOS, musl) or
    with ``SVDECODE_KEEP_FREED_MEMORY=0``."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # glibc refuses an mmap threshold above half its largest heap (32 MiB on most 64-bit builds)
    for value in (threshold, 32 << 20):
        if mallopt(M_MMAP_THRESHOLD, value):
            return bool(mallopt(M_TRIM_THRESHOLD, min(2 * value, 2**31 - 1)))
    return False
