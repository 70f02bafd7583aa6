"""Give freed tensor memory back to the OS on CPU learners.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which tensors
of that size come from the heap, where freed memory stays resident and fragments: a learner's RSS climbs past
its peak of live tensors and stays. Fixing the threshold at 128 KiB keeps every large buffer an mmap that is
unmapped when freed (bench/limits_learner.py: a large-model ZeRO-3 rank at rest, 1,239 -> 551 MiB above its
libraries).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
THRESHOLD = 128 * 1024


def return_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
