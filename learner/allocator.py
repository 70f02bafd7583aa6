"""The learner ranks' memory allocator: glibc's (the default) or jemalloc, preloaded into the rank's process.

A learner frees and reallocates activations, gathered ZeRO-3 weights and gradients every micro-batch. glibc's
heap keeps what it freed resident (its mmap threshold rises after large frees), so a rank's host RSS ends
far above what it holds live; jemalloc returns it. Measured on 2 CPU ranks (BENCHMARKS.md,
`bench/limits_learner.py`): peak RSS above start 30-45% lower on the 46M and 160M models (ZeRO-3, 160M:
4,915 -> 2,703 MiB), for a CPU step 0.97-1.16x as long, hence opt-in.

An allocator must be in place before the process allocates, so it goes in through the actor's environment
(LD_PRELOAD by soname: each node's loader finds its own copy), and the rank checks it was loaded.
"""
from __future__ import annotations

import ctypes.util

JEMALLOC = "libjemalloc.so.2"
INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install libjemalloc2) or set learner.allocator=system"


def allocator_env(allocator: str) -> dict[str, str]:
    """Environment variables for a learner actor; raises when this node has no jemalloc to preload."""
    if allocator == "system":
        return {}
    if ctypes.util.find_library("jemalloc") is None:
        raise RuntimeError(f"learner.allocator=jemalloc, but this node has no {JEMALLOC}: {INSTALL_HINT}")
    return {"LD_PRELOAD": JEMALLOC}


def loaded_allocator(maps: str = "/proc/self/maps") -> str:
    """`jemalloc` when the running process has it mapped, else `system`."""
    with open(maps) as f:
        return "jemalloc" if any("libjemalloc" in line for line in f) else "system"


def check_allocator(allocator: str, where: str) -> None:
    """Fail a rank whose process did not get the allocator its config asks for (a node without it)."""
    if allocator != "system" and loaded_allocator() != allocator:
        raise RuntimeError(f"learner.allocator={allocator}, but {where} runs without {JEMALLOC}: "
                           f"{INSTALL_HINT}")
