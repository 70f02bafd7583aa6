"""The in-process GRPO loop end to end on the tiny model and the bundled data."""
from __future__ import annotations

import json

import pytest

from cluster.cli import DEFAULT_DEMO_CONFIG, main
from cluster.config import DemoConfig
from cluster.demo import run_demo
from cluster.schema import load_config


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_write_metrics(tmp_path):
    cfg = load_config(DemoConfig, DEFAULT_DEMO_CONFIG, ["train.steps=2", "train.warm_start_steps=2",
                                                        "train.eval_every=1", "data.eval_limit=8",
                                                        "algorithm.beta=0.04", "sampling.n=4"])
    result = run_demo(cfg, tmp_path)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/accuracy"] == result["grpo_start"] and rows[-1]["eval/accuracy"] == result["final"]
    step = rows[1]
    for key in ("reward/mean", "reward/cls_equality", "length/mean", "kl", "clip_frac", "grad_norm",
                "logprob_gap", "time/generate", "time/train"):
        assert key in step, key
    assert step["logprob_gap"] < 1e-4  # rollout and learner score the same tokens the same way


def test_cli_rejects_a_typo(capsys):
    assert main(["demo", "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_shows_grpo_learning(tmp_path):
    """The embedded default: accuracy at GRPO start is near chance (4 classes) and clearly higher after."""
    cfg = load_config(DemoConfig, DEFAULT_DEMO_CONFIG)
    result = run_demo(cfg, tmp_path)
    assert result["grpo_start"] <= 0.45
    assert result["final"] >= result["grpo_start"] + 0.3, result
