"""A two-data-set run through the whole distributed loop: weighted batches, per-data-set rewards, metrics and evals,
each data set's epoch position carried through a checkpoint, retention of checkpoints, the driver log."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from cluster.driver import TRAINED_FILE, train
from commands.cli import REPO_ROOT
from protocol.config import ExperimentConfig
from protocol.overrides import from_dict
from tasks.bundled import ensure_bundled
from tasks.manifest import read_dataset
from tasks.mixture import MixtureOrder

PROMPTS = 6  # per step, split 4 shapes : 2 digits by the 2:1 weights


def _config(steps: int) -> ExperimentConfig:
    data = yaml.safe_load((REPO_ROOT / "configs" / "cpu_multi.yaml").read_text())
    data["datasets"][0]["data"]["eval_limit"] = 8
    data["datasets"][1]["data"]["eval_limit"] = 10
    data["sampling"].update(n=4, max_new_tokens=8)
    data["learner"]["micro_batch_size"] = 4
    data["train"].update(steps=steps, prompts_per_step=PROMPTS, warm_start_steps=2, eval_every=1, save_every=1,
                         keep_last=2, keep_best=1)
    data["weight_sync"] = {"timeout_s": 15}
    data["cluster"].update(rollout_workers=1, learner_ranks=1)  # the mixture does not depend on them
    return from_dict(ExperimentConfig, data)


def _expected_batches(steps: int, seed: int) -> list[Counter]:
    """The prompts an uninterrupted run trains on, step by step (each step is one chunk in synchronous mode)."""
    ids = {name: [f"{name}/{s.id}" for s in read_dataset(ensure_bundled(name)).split("train")]
           for name in ("shapes", "digits")}
    order = MixtureOrder(ids, {"shapes": 2.0, "digits": 1.0}, seed)
    return [Counter(order.next_batch(PROMPTS)) for _ in range(steps)]


@pytest.mark.slow
def test_two_datasets_train_with_their_own_rewards_and_resume_in_place(ray_local, tmp_path):
    cfg = _config(steps=3)
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = rows[1]
    for key in ("reward/shapes/mean", "reward/digits/mean", "reward/digits/format", "reward/shapes/cls_equality",
                "reward/cls_accuracy", "eval/shapes/accuracy", "eval/digits/accuracy", "data/shapes/epoch"):
        assert key in step, key
    assert "reward/shapes/format" not in step  # shapes has no format reward
    for r in rows:
        assert r["eval/accuracy"] == pytest.approx((r["eval/shapes/accuracy"] + r["eval/digits/accuracy"]) / 2)
    answers = [json.loads(line) for line in (tmp_path / "eval" / "step-000003.jsonl").read_text().splitlines()]
    assert Counter(a["dataset"] for a in answers) == {"shapes": 8, "digits": 10}

    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert {"step-000002", "step-000003"} <= set(kept) and len(kept) <= 3  # keep_last 2 (+ the best, if older)
    assert "step 3:" in (tmp_path / "driver.log").read_text()

    train(_config(steps=5), tmp_path, resume=True)  # continues at step 4 from step-000003
    trained = [json.loads(line) for line in (tmp_path / TRAINED_FILE).read_text().splitlines()]
    assert [t["step"] for t in trained] == [1, 2, 3, 4, 5]
    assert [Counter(t["prompt_ids"]) for t in trained] == _expected_batches(5, cfg.train.seed)  # no repeat, no skip
    assert sorted(d for t in trained for d in t["draws"]) == list(range(5 * PROMPTS))
