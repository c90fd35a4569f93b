"""Keep freed tensor memory in the process (glibc), so CPU forward passes stop paying page faults.

glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB to 32 MiB, adapted at run
time) from fresh ``mmap`` pages and unmaps them on ``free``: every activation of a CPU forward
pass (a few MB each) is then page-faulted in again, one 4 KiB page at a time. On this project's
scoring that was a quarter of the CPU time as system time (``benchmarks/truthfulqa_mc.py``).
Raising the mmap and trim thresholds keeps the freed blocks in the heap for the next pass; the
peak memory is unchanged. PyTorch's CPU tuning guide reaches the same end with jemalloc or
tcmalloc through ``LD_PRELOAD``; this needs no extra library and no launcher.

The cost is fragmentation: blocks of many sizes (a 152k-vocabulary logit block is 0.6 MB a row)
leave free holes that a larger request cannot use, so the peak moves from run to run whatever the
amount of data (an MC test at 151,936 logits: 1,054-1,607 MB at 8, 32 and 64 questions; 964-1,014
MB with the setting off). :func:`release_freed_memory`, called after each evaluation batch, hands
the holes back past 64 MB (965-1,124 MB in the same runs); while the heap is steady it does
nothing, so no page is faulted in again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

#: ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Set to 0 to leave the C allocator as it is.
ENV = "SVDECODE_KEEP_FREED_MEMORY"


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): the main arena's byte counts."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Blocks up to ``threshold`` bytes come from (and return to) the heap, and the heap is not
    trimmed below that size. True if glibc took the settings; a no-op elsewhere (macOS, musl) or
    with ``SVDECODE_KEEP_FREED_MEMORY=0``."""
    libc = _libc() if os.environ.get(ENV, "1") != "0" else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # glibc refuses an mmap threshold above half its largest heap (32 MiB on most 64-bit builds)
    for value in (threshold, 32 << 20):
        if mallopt(M_MMAP_THRESHOLD, value):
            return bool(mallopt(M_TRIM_THRESHOLD, min(2 * value, 2**31 - 1)))
    return False


def release_freed_memory(limit: int = 64 << 20) -> bool:
    """Return the heap's free pages to the system (``malloc_trim``) when more than ``limit`` bytes
    of it lie free; True if it did. A no-op without glibc 2.33+ (``mallinfo2``). Reading the count
    costs microseconds, so this may run after every batch: while the heap is steady nothing is
    released and no page is faulted in again."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None or not hasattr(libc, "malloc_trim"):
        return False
    mallinfo2.restype = _MallInfo2
    if mallinfo2().fordblks <= limit:
        return False
    libc.malloc_trim(0)
    return True
