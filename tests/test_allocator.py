"""The heap's free holes go back to the system past a bound, and only then (glibc)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from svdecode_pl.utils.allocator import _libc, release_freed_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(_libc(), "mallinfo2"),
    reason="glibc 2.33+ only (mallinfo2); elsewhere release_freed_memory is a no-op")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def heap_holes(mb: int) -> int:
    """``mb`` MB of touched 64 KiB heap blocks (below any mmap threshold), then freed: pages the
    process still holds while the heap keeps them."""
    libc = _libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(mb * 16)]
    for block in blocks:
        ctypes.memset(block, 1, 64 << 10)
    for block in blocks[:-1]:  # the last one pins the heap's top, so only a trim in the middle frees pages
        libc.free(block)
    return blocks[-1]


def test_free_holes_past_the_bound_are_released():
    last = heap_holes(200)
    before = resident_mb()
    assert release_freed_memory(limit=100 << 20)
    assert before - resident_mb() > 150
    _libc().free(last)


def test_nothing_is_released_under_the_bound():
    last = heap_holes(50)
    before = resident_mb()
    assert not release_freed_memory(limit=1 << 40)
    assert abs(before - resident_mb()) < 5
    _libc().free(last)
