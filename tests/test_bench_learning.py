"""bench/learning.py: its data sets load as a user's ImageFolder would, its summary checks the issue-18 targets
(gain >= 0.30, entropy above 0.3 at the end) per data set and arm, and `--quick` runs real training end to end
(slow) and writes the tables and both plots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning import summarize, tables  # noqa: E402
from bench.learning_data import dataset_overrides  # noqa: E402
from protocol.config import ExperimentConfig  # noqa: E402
from protocol.overrides import load_config  # noqa: E402
from tasks.data import load_run_data  # noqa: E402


def test_made_data_sets_load_with_their_classes(tmp_path):
    for name, classes, train in (("digits10", 10, 160), ("shapes12", 12, 288)):
        cfg = load_config(ExperimentConfig, ROOT / "configs" / "cpu_demo.yaml",
                          dataset_overrides(name, tmp_path) + ["data.eval_limit=null"])
        data = load_run_data(cfg)
        assert len(data.train_examples) == train
        assert len({e.solution for e in data.test_examples}) == classes
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        dataset_overrides("cifar", tmp_path)


def _run(dataset, arm, seed, start, final, entropy, warnings=0):
    return {"dataset": dataset, "arm": arm, "seed": seed, "curve": [(0, 0.0, start), (300, 200.0, final)],
            "start": start, "final": final, "entropy_end": entropy, "diversity_end": 1.0,
            "collapse_warnings": warnings, "loop_s": 200.0, "run_s": 260.0}


def test_summary_checks_the_targets_and_reports_the_gap_to_sft():
    runs = [_run("digits10", "grpo_default", s, 0.1, 0.5 + s / 100, 1.6) for s in range(3)]
    runs += [_run("shapes", "grpo_default", 0, 0.25, 0.45, 1.2), _run("shapes12", "grpo_default", 0, 0.1, 0.6, 0.1, 1)]
    runs += [_run("digits10", "sft", s, 0.1, 0.77, None) for s in range(3)]
    summary = {(s["dataset"], s["arm"]): s for s in summarize(runs)}
    assert summary[("digits10", "grpo_default")]["target"] == "met"
    assert summary[("digits10", "grpo_default")]["final"] == [0.5, 0.51, 0.52]
    assert summary[("shapes", "grpo_default")]["target"] == "missed: gain +0.20 < 0.3"
    assert summary[("shapes12", "grpo_default")]["target"] == "missed: entropy 0.10 <= 0.3"
    assert "target" not in summary[("digits10", "sft")]
    text = tables(list(summary.values()))
    assert "| digits10 (10) | grpo_default | 3 | 300 | 0.100 [0.100, 0.100] | 0.510 [0.500, 0.520] |" in text
    assert "| digits10 | grpo_default | -0.260 |" in text


@pytest.mark.slow
def test_learning_quick_runs_real_training_and_writes_plots(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["dataset"], r["arm"]) for r in report["runs"]} == {
        ("digits10", a) for a in ("grpo_default", "sft")}
    for r in report["runs"]:
        assert [p[0] for p in r["curve"]] == [0, 2, 4] and all(0 <= p[2] <= 1 for p in r["curve"])
        assert r["curve"][-1][1] > 0  # wall seconds accumulate
        assert (r["entropy_end"] is None) == (r["arm"] == "sft")
    for name in ("accuracy_vs_step", "accuracy_vs_time"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "| digits10 (10) | grpo_default | 1 | 4 |" in proc.stdout
