"""The SFT baseline on the same learner group (train.mode: sft) and the free-lunch transfer matrix."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from cluster.driver import train
from commands.cli import REPO_ROOT
from commands.transfer import run_transfer
from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, from_dict, load_config
from tasks.data import load_run_data

SMALL_TRAIN = dict(prompts_per_step=8, warm_start_steps=0, eval_every=0, save_every=0)


def _multi(**train_keys) -> ExperimentConfig:
    data = yaml.safe_load((REPO_ROOT / "configs" / "cpu_multi.yaml").read_text())
    data["datasets"][0]["data"]["eval_limit"] = 8
    data["datasets"][1]["data"]["eval_limit"] = 10
    data["sampling"].update(n=4, max_new_tokens=6)
    data["learner"]["micro_batch_size"] = 4
    data["train"].update(SMALL_TRAIN, **train_keys)
    data["weight_sync"] = {"timeout_s": 15}
    data["cluster"].update(rollout_workers=1, learner_ranks=1)  # the claims here are not about actor counts
    return from_dict(ExperimentConfig, data)


def test_sft_micro_batches_count_one_sequence_per_prompt():
    with pytest.raises(ConfigError, match=r"SFT: one per prompt\) = 2 sequences"):
        load_config(ExperimentConfig, REPO_ROOT / "configs" / "cpu_demo.yaml",
                    ["train.mode=sft", "train.prompts_per_step=4", "learner.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train.mode must be grpo|sft"):
        load_config(ExperimentConfig, REPO_ROOT / "configs" / "cpu_demo.yaml", ["train.mode=dpo"])


@pytest.mark.slow
def test_sft_learns_the_answers_in_each_tasks_format(ray_local, tmp_path):
    """Supervised targets are the labels (think/answer-wrapped for digits' cls_rl prompt): the loss falls and
    held-out accuracy rises from zero on both data sets."""
    cfg = _multi(mode="sft", steps=30, eval_every=30)
    result = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sft_loss"] for r in rows if "sft_loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert result["final"] > result["grpo_start"]
    final = [json.loads(line) for line in (tmp_path / "eval" / "step-000030.jsonl").read_text().splitlines()]
    wrapped = {d: [a["text"].startswith("<think>") for a in final if a["dataset"] == d]
               for d in ("shapes", "digits")}
    # each task's answer format: think-wrapped or bare
    assert all(wrapped["digits"]) and not any(wrapped["shapes"])
    from vlm.processor import load_processor

    load_processor(tmp_path / "checkpoints" / "step-000030" / "hf")  # the export carries its processor


@pytest.mark.slow
def test_transfer_matrix_trains_on_each_and_tests_on_all(ray_local, tmp_path):
    cfg = _multi(mode="sft", steps=30)  # supervised: each model learns its own data set's answers
    result = run_transfer(cfg, tmp_path)
    names = ["shapes", "digits"]
    assert result["datasets"] == names
    # the table from the graded answers on disk: each trained model's, and the start model's (zero-shot)
    evals = {t: json.loads((tmp_path / "eval" / t / "eval.json").read_text()) for t in names}
    start = json.loads((tmp_path / "zero_shot" / "eval.json").read_text())
    assert start["model"] == load_run_data(cfg).model_path  # the model every run starts from

    def accuracy(ev: dict, s: str) -> float:
        answers = ev["datasets"][s]["answers"]
        assert len(answers) == {"shapes": 8, "digits": 10}[s]  # every test image of the data set, once
        return sum(a["correct"] for a in answers) / len(answers)

    rows = list(csv.reader(open(tmp_path / "transfer.csv")))
    assert rows[0] == ["trained on \\ tested on", *names]
    assert [r[0] for r in rows[1:]] == [*names, "zero-shot accuracy"]
    assert accuracy(evals["shapes"], "shapes") > accuracy(start, "shapes")  # not a table of zeros
    for t, row in zip(names, rows[1:]):
        assert evals[t]["model"].startswith(str(tmp_path / "runs" / t))  # tested: the model trained on t
        assert row[1:] == [f"{100 * (accuracy(evals[t], s) - accuracy(start, s)):.2f}" for s in names]
    assert rows[-1][1:] == [f"{100 * accuracy(start, s):.2f}" for s in names]
    assert (tmp_path / "transfer.png").stat().st_size > 5000
    assert "| trained on | shapes | digits |\n|---|---:|---:|\n" in (tmp_path / "transfer.md").read_text()
    assert (tmp_path / "runs" / "shapes" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "digits").is_dir()
    # a finished run can stand in for training: same numbers, no new run
    again = run_transfer(cfg, tmp_path / "reuse", checkpoints={n: str(tmp_path / "runs" / n) for n in names})
    assert again["accuracy"] == result["accuracy"] and not (tmp_path / "reuse" / "runs").exists()
