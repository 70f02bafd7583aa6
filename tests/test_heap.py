"""learner/heap.py: with glibc's thresholds fixed, a freed large buffer leaves the process's resident memory."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.path.insert(0, {root!r})
import torch
from learner.heap import return_freed_memory

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096

if {fixed}:
    assert return_freed_memory()
base = rss()
for size in (16, 24, 20, 28, 18, 26):  # MiB: frees that raise glibc's adaptive threshold, then reuse of the heap
    keep = [torch.ones(size * 2**18) for _ in range(8)]
    del keep
print((rss() - base) // 2**20)
"""


def held_after_frees(fixed: bool) -> int:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CODE.format(root=root, fixed=fixed)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_tensors_leave_resident_memory():
    assert held_after_frees(fixed=True) < 16
    assert held_after_frees(fixed=False) > 32  # glibc's default keeps them: the test can tell the difference
