"""bench/bench_rewards.py --quick runs and prints one table row per reward (no timing checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rewards import available

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_prints_a_row_per_reward():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_rewards.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| reward |")
    names = [row.split("|")[1].strip() for row in rows[1:]]
    for name in available():
        assert name in names, (name, proc.stdout)
    assert "rec_iou (threshold=0.5)" in names
    for row in rows[1:]:
        rate = row.split("|")[2].strip().replace(",", "")
        assert float(rate) > 0
