"""bench/vs_trl.py --quick trains the tiny model with TRL, clsrl sync and clsrl async, and writes a complete,
self-consistent result (no timing checks). The small model takes the same code path with other sizes: its
overrides are checked to load (the full run, `make bench`, trains it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ["trl", "clsrl-sync", "clsrl-async"]
TARGETS = {("tiny", "clsrl-sync"): 0.8, ("small", "clsrl-sync"): 1.0, ("small", "clsrl-async"): 1.3}


def quick_run(out: Path) -> tuple[dict, str, Path]:
    # one thread each: the smoke test often shares its cores, where two threads only contend
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--quick", "--models", "tiny",
                           "--trl-threads", "1",
                           "--sync-threads", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout, out


@pytest.mark.slow
def test_quick_run_trains_the_same_samples_and_reports_ratios_targets_table_and_plot(tmp_path):
    """One run read by both checks (as two tests, pytest -n ran it twice when they landed on two workers)."""
    run = quick_run(tmp_path)
    every_model_and_system_trains_the_same_samples(run)
    ratios_targets_table_and_plot(run)


def every_model_and_system_trains_the_same_samples(quick_run):
    report, _, _ = quick_run
    assert report["quick"] and report["skip"] == 1
    assert report["threads"] == {"trl": 1, "clsrl-sync": 1, "clsrl-async": 1}
    assert list(report["models"]) == ["tiny"]
    for name, m in report["models"].items():
        assert list(m["systems"]) == SYSTEMS
        assert m["samples_per_step"] == 4 * 4  # --quick: 4 prompts x G=4
        assert m["params_m"] > (10 if name == "small" else 0.1)
        for system, r in m["systems"].items():
            assert r["steps"] == 2 and r["measured_steps"] == 1, (name, system)
            assert r["samples"] == r["samples_counted"] == 2 * m["samples_per_step"], (name, system)  # counted, not assumed
            assert len(r["step_s"]) == 2 and r["measured_seconds"] == pytest.approx(r["step_s"][1])
            assert r["samples_per_s"] == pytest.approx(m["samples_per_step"] / r["step_s"][1])
            assert r["steps_per_s"] == pytest.approx(1 / r["step_s"][1])
            assert r["startup_s"] > 0 and r["generate_s_per_step"] >= 0  # async: busy seconds per step, may be 0
            assert r["reward"], (name, system)  # the reward curve: (samples trained, mean reward) per step
            for samples, reward in r["reward"]:
                assert samples % m["samples_per_step"] == 0 and 0 < samples <= r["samples"]
                assert 0.0 <= reward <= 1.0  # cls_equality
            assert 0.0 <= r["grpo_start_accuracy"] <= 1.0 and 0.0 <= r["final_accuracy"] <= 1.0
        assert [r["threads"] for r in m["systems"].values()] == [1, 1, 1]
        assert set(m["systems"]["clsrl-sync"]["staleness"]) == {"0"}  # synchronous: always the newest weights
        # the same starting checkpoint everywhere: the same greedy answers before training
        starts = {r["grpo_start_accuracy"] for r in m["systems"].values()}
        assert len(starts) == 1, starts


def ratios_targets_table_and_plot(quick_run):
    report, stdout, out = quick_run
    for name, m in report["models"].items():
        trl = m["systems"]["trl"]["samples_per_s"]
        assert set(m["ratio_vs_trl"]) == {"clsrl-sync", "clsrl-async"}
        for system, ratio in m["ratio_vs_trl"].items():
            assert ratio == pytest.approx(m["systems"][system]["samples_per_s"] / trl)
        expected = {s for (model, s) in TARGETS if model == name}
        assert set(m["targets"]) == expected
        for system, goal in m["targets"].items():
            assert goal["target"] == TARGETS[(name, system)] and goal["met"] == (goal["ratio"] >= goal["target"])
    assert (out / "vs_trl.png").stat().st_size > 1000
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0][1].strip() == "model"
    assert [(r[1].strip(), r[3].strip()) for r in rows[1:]] == [("tiny", s) for s in SYSTEMS]


def test_every_models_overrides_load_as_a_config():
    sys.path.insert(0, str(ROOT))
    from bench.vs_trl import MODELS, load, model_overrides

    for name in MODELS:
        for quick in (False, True):
            cfg = load(model_overrides(name, quick))
            assert cfg.cluster.learner_ranks == 1 and cfg.sampling.n == (4 if quick else 8), name
