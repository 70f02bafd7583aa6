"""bench/async_vs_sync.py --quick runs a synchronous and an asynchronous mode and writes a complete result (no timing checks)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_async_vs_sync_quick_writes_results_table_and_plot(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "async_vs_sync.py"), "--quick", "--modes", "0,1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [m["mode"] for m in report["modes"]] == ["sync", "async-1"]
    groups_per_step = report["samples_per_step"] // 4  # --quick: sampling.n=4
    for m in report["modes"]:
        assert m["steps"] == 2 and m["samples"] == 2 * report["samples_per_step"]
        assert m["samples_per_s"] > 0 and m["steps_per_hour"] > 0 and m["excluded_s"] > 0
        assert m["step_s"]["step"] > 0 and m["step_s"]["train_step"] > 0
        assert 0 <= m["final_accuracy"] <= 1 and 0 <= m["grpo_start_accuracy"] <= 1
        assert sum(m["staleness"].values()) == 2 * groups_per_step  # every trained group counted once
        assert max(int(k) for k in m["staleness"]) <= m["max_staleness"]
        assert (Path(m["run_dir"]) / "staleness.json").is_file()
    assert set(report["modes"][0]["staleness"]) == {"0"}  # synchronous: always the latest weights
    ahead = {k: v for k, v in report["modes"][1]["staleness"].items() if int(k) >= 1}
    assert ahead, report["modes"][1]["staleness"]  # async-1 ran ahead: some groups trained one version late
    assert report["ratio_vs_sync"]["sync"] == 1.0 and report["ratio_vs_sync"]["async-1"] > 0
    assert (tmp_path / "async_vs_sync.png").stat().st_size > 1000
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| mode |") and [r.split("|")[1].strip() for r in rows[1:]] == ["sync", "async-1"]
