"""Collapse detection (telemetry/collapse.py) on metrics rows shaped like a real run's, the answer metrics it
reads, and `clsrl report`'s health section replaying it. Pure: no Ray."""
from __future__ import annotations

import json
import logging

import pytest

from cluster.step_metrics import eval_metrics, learner_metrics, rollout_metrics
from commands.report import build_report
from protocol.results import DatasetRewards, EvalAnswer, LearnerStep, RolloutSummary
from telemetry.collapse import (
    ENTROPY_FLAG,
    NO_SIGNAL_FLAG,
    CollapseWatch,
    answer_diversity,
    group_answer_shares,
    replay,
)


def grpo_rows(entropy: list[float], equal: list[float], start: int = 1) -> list[dict]:
    return [{"step": start + i, "entropy": e, "groups/equal_rewards": q, "reward/mean": 0.2}
            for i, (e, q) in enumerate(zip(entropy, equal))]


def the_issue_run() -> list[dict]:
    """Issue 18's digits run: entropy 1.47 -> 0.06, equal-reward groups 31% -> 94% over 100 steps."""
    n = 100
    return grpo_rows([1.47 - (1.47 - 0.06) * min(1, i / 60) for i in range(n)],
                     [0.31 + (0.94 - 0.31) * min(1, i / 50) for i in range(n)])


def test_healthy_run_gives_no_warning(caplog):
    watch = CollapseWatch()
    with caplog.at_level(logging.WARNING, logger="telemetry.collapse"):
        rows = [watch.observe(r) for r in grpo_rows([1.7] * 50, [0.35] * 50)]
    assert watch.warnings == [] and caplog.records == []
    assert all(r[ENTROPY_FLAG] == 0.0 and r[NO_SIGNAL_FLAG] == 0.0 for r in rows)


def test_issue_run_warns_once_per_condition_with_causes_and_settings(caplog):
    watch = CollapseWatch()
    with caplog.at_level(logging.WARNING, logger="telemetry.collapse"):
        rows = [watch.observe(r) for r in the_issue_run()]
    assert len(watch.warnings) == 2 and [r.getMessage() for r in caplog.records] == watch.warnings
    signal, entropy = watch.warnings  # the groups die (94% equal) before the entropy reaches 0.3
    assert "no gradient" in signal and "entropy below 0.3" in entropy
    for w in watch.warnings:
        assert "learner.lr" in w and "clip_high" in w and "dynamic_sampling" in w
    # flagged from the step the 10-step window first lies wholly past the threshold, to the end
    first_low = next(r["step"] for r in rows if r["entropy"] < 0.3)
    assert [r["step"] for r in rows if r[ENTROPY_FLAG]] == list(range(first_low + 9, 101))
    assert f"step {first_low + 9}:" in entropy


def test_a_short_dip_is_not_a_collapse():
    watch = CollapseWatch(window=10)
    rows = [watch.observe(r) for r in grpo_rows([1.5] * 5 + [0.1] * 9 + [1.2] * 10, [0.9] * 9 + [0.2] * 15)]
    assert watch.warnings == [] and not any(r[ENTROPY_FLAG] or r[NO_SIGNAL_FLAG] for r in rows)


def test_warning_rearms_after_recovery():
    watch = CollapseWatch(window=3)
    for r in grpo_rows([0.1] * 4 + [1.0] * 2 + [0.1] * 3, [0.2] * 9):
        watch.observe(r)
    assert [w.split(":")[0] for w in watch.warnings] == ["step 3", "step 9"]


def test_dynamic_sampling_filtered_share_counts_as_no_signal():
    """With dynamic sampling the learners see no equal groups: the filtered share carries the signal."""
    watch = CollapseWatch(window=4)
    for step in range(1, 9):
        watch.observe({"step": step, "entropy": 1.0, "groups/equal_rewards": 0.0, "groups/filtered": 0.9})
    assert len(watch.warnings) == 1 and "(now 90%" in watch.warnings[0]


def test_groups_all_right_are_not_a_collapse():
    """Dynamic sampling drops groups all right as well as all wrong: a solved training set is no collapse."""
    watch = CollapseWatch(window=3)
    for step in range(1, 9):
        watch.observe({"step": step, "entropy": 1.4, "groups/filtered": 0.9, "reward/mean": 0.95})
    assert watch.warnings == []


def test_bad_window_is_named():
    with pytest.raises(ValueError, match="window must be >= 1"):
        CollapseWatch(window=0)


def test_group_answer_shares():
    groups = [
        (["zero"] * 4, [0.0] * 4),  # collapsed on a wrong answer
        ([" Zero", "zero ", "ZERO", "zero"], [1.0] * 4),  # one answer, right
        (["<think>a</think><answer>six</answer>", "<think>b</think><answer>six</answer>"], [0.0, 0.0]),
        (["one", "two", "one", "one"], [1.0, 0.0, 1.0, 1.0]),  # a group that learns
    ]
    assert group_answer_shares(groups) == {"groups/one_answer": 0.75, "groups/one_wrong_answer": 0.5}
    assert group_answer_shares([]) == {}


def test_answer_diversity():
    solutions = [f"c{i % 10}" for i in range(40)]
    assert answer_diversity(["zero"] * 40, solutions) == pytest.approx(0.1)
    assert answer_diversity([f"C{i % 10} " for i in range(40)], solutions) == 1.0
    with pytest.raises(ValueError, match="at least one answer"):
        answer_diversity([], [])


def test_step_metrics_carry_the_new_shares():
    answers = [EvalAnswer("digits", f"p{i}", "zero", f"c{i % 10}", float(i % 10 == 0), 2, False)
               for i in range(20)]
    row = eval_metrics(answers)
    assert row["eval/accuracy"] == pytest.approx(0.1) and row["eval/answer_diversity"] == pytest.approx(0.1)
    summary = RolloutSummary(published=[1, 2, 3], filtered=[4], lengths=[2] * 32, version_spans=[0] * 4,
                             seconds={"generate": 1.0})
    summary.datasets["digits"] = DatasetRewards(rewards=[0.0] * 32)
    assert rollout_metrics([summary])["groups/filtered"] == 0.25
    ranks = [LearnerStep({"entropy": 0.1}, [1], ["p"], [0], [], 0, 1.0, 0.0, 0.0, one_answer=a,
                         one_wrong_answer=a / 2) for a in (1.0, 0.5)]
    row = learner_metrics(ranks)
    assert row["groups/one_answer"] == 0.75 and row["groups/one_wrong_answer"] == 0.375


def test_report_shows_the_collapse(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = the_issue_run()
    rows[0]["eval/answer_diversity"], rows[-1]["eval/answer_diversity"] = 0.9, 0.3
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = build_report(run).read_text()
    health = md.split("## Training health\n", 1)[1].split("\n## ", 1)[0]
    assert health.count("**collapse warning**") == 2 and "no collapse" not in health
    assert "entropy at step 100: 0.060" in health and "0.90 at step 1, 0.30 at step 100" in health
    assert replay(rows) == replay(rows)  # replaying twice: no state leaks between reports


def test_report_of_a_healthy_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grpo_rows([1.6] * 30, [0.3] * 30)))
    assert "- no collapse detected\n" in build_report(run).read_text()


@pytest.mark.slow
def test_clsrl_train_console_warns_when_no_group_carries_a_gradient(tmp_path):
    """End to end through the driver: with no format warm start every answer is wrong, so every group's
    rewards are equal; after 3 such steps (a window of 3) the console says so once and metrics.jsonl flags it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "commands.cli", "train", "train.steps=4", "train.warm_start_steps=0",
         "train.prompts_per_step=4", "train.eval_every=0", "train.save_every=0", "data.eval_limit=4",
         "sampling.n=4", "learner.micro_batch_size=8", "train.loggers=[]", "algorithm.dynamic_sampling=false",
         "train.collapse_window=3", "cluster.rollout_workers=1", "cluster.learner_ranks=1",
         "--run-dir", str(run)], cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["groups/equal_rewards"] for r in rows] == [1.0] * 4
    assert [r[NO_SIGNAL_FLAG] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    lines = [line for line in proc.stdout.splitlines() if "GRPO collapse" in line]
    assert len(lines) == 1 and "step 3: GRPO collapse" in lines[0] and "learner.lr" in lines[0], proc.stdout[-3000:]
    assert "steps flagged as collapsed while training**: 2" in build_report(run).read_text()
