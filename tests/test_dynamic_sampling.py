"""Dynamic sampling through the distributed loop: groups whose G rewards are all equal are dropped at the rollout
worker, counted, and their slots topped up with fresh prompts, so every step still trains on full batches."""
from __future__ import annotations

import json

import pytest

from cluster.driver import TRAINED_FILE, train
from commands.cli import DEFAULT_CONFIG
from protocol.config import ExperimentConfig
from protocol.overrides import load_config


@pytest.mark.slow
def test_equal_reward_groups_are_dropped_and_topped_up(ray_local, tmp_path):
    # After the format warm start the model names a random class: a group of 4 is all wrong ~30% of the time
    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, [
        "algorithm.dynamic_sampling=true", "train.steps=3", "train.prompts_per_step=8", "train.warm_start_steps=60",
        "train.eval_every=0", "train.save_every=0", "data.eval_limit=8", "sampling.n=4", "learner.micro_batch_size=4",
        "rollout.prompts_per_call=4", "weight_sync.timeout_s=15", "cluster.rollout_workers=1", "cluster.learner_ranks=1"])
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    trained = [json.loads(line) for line in (tmp_path / TRAINED_FILE).read_text().splitlines()]
    assert sum(r.get("dropped/filtered", 0) for r in rows) > 0  # some groups were all-equal and dropped
    assert [len(t["draws"]) for t in trained] == [8, 8, 8]  # ... yet every step trained a full batch
    draws = [d for t in trained for d in t["draws"]]
    assert len(set(draws)) == len(draws) and max(draws) >= len(draws)  # topped up with later draws, none twice
    assert all(r["groups/equal_rewards"] == 0 for r in rows)  # the learners saw only groups with a signal
