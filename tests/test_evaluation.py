"""`clsrl eval`: greedy answers over Ray engines, per-data-set protocols, base-to-new with H, eval.json +
eval.md."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from commands.cli import DEFAULT_CONFIG, REPO_ROOT, main
from commands.evaluation import _answer_all, harmonic_mean, markdown_table, resolve_model, run_eval
from protocol.config import ExperimentConfig
from protocol.overrides import load_config
from protocol.rollout import RolloutRequest
from rewards import get_reward


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_resolve_model_accepts_model_checkpoint_and_run_dirs(tmp_path):
    hf = tmp_path / "run" / "checkpoints" / "step-000004" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf.parent / "driver.json").write_text("{}")  # a finished checkpoint
    assert resolve_model(hf) == hf and resolve_model(hf.parent) == hf
    assert resolve_model(tmp_path / "run") == hf
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_model(tmp_path)


def test_markdown_table_reports_base_new_and_h():
    result = {"model": "m", "max_new_tokens": 8, "mean_accuracy": 0.5,
              "datasets": {"a/base": {"protocol": "p", "images": 4, "accuracy": 1.0, "truncated": 0},
                           "a/new": {"protocol": "p", "images": 4, "accuracy": 0.0, "truncated": 1}},
              "base_to_new": {"a": {"base": 1.0, "new": 0.0, "H": 0.0}}}
    table = markdown_table(result)
    assert "| a/base | p | 4 | 100.00 | 0 |" in table and "| a | 100.00 | 0.00 | 0.00 |" in table
    assert "|---|---|---:|---:|---:|" in table
    assert "\n\n| data set | base (%) | new (%) | H (%) |\n|---|---:|" in table


@pytest.mark.slow
def test_answer_all_keeps_request_order_and_names_a_dead_worker(ray_local):
    @dataclasses.dataclass
    class Answer:  # a stand-in for EvalWorker's answers, read by key as eval.json's rows are
        prompt_id: str
        by: float

        def __getitem__(self, key: str):
            return getattr(self, key)

    class Engine:  # the slow worker answers its chunks last: the pool hands them back out of order
        def __init__(self, delay: float) -> None:
            self.delay = delay

        def answer(self, requests: list, max_new_tokens: int) -> list[Answer]:
            if max_new_tokens == 0:
                os._exit(1)  # a killed engine process
            time.sleep(self.delay)
            return [Answer(r.prompt_id, self.delay) for r in requests]

    Worker = ray_local.remote(num_cpus=0.1)(Engine)
    workers = [Worker.remote(0.3), Worker.remote(0.0)]
    requests = [RolloutRequest(f"d/{i}", None) for i in range(7)]
    rows = _answer_all(workers, requests, 2, 8, "eval")
    assert [r["prompt_id"] for r in rows] == [r.prompt_id for r in requests]
    assert {r["by"] for r in rows} == {0.3, 0.0}  # both workers took chunks
    with pytest.raises(RuntimeError, match=r"eval: an eval worker died with 0 of 7 answers in \(its engine"):
        _answer_all(workers, requests, 2, 0, "eval")
    for w in workers:
        ray_local.kill(w)


@pytest.mark.slow
def test_eval_two_datasets_base_to_new_over_ray(ray_local, tmp_path):
    cfg = load_config(ExperimentConfig, REPO_ROOT / "configs" / "cpu_multi.yaml",
                      ["rollout.prompts_per_call=8", "cluster.rollout_workers=1"])
    result = run_eval(cfg, tmp_path, protocol="visual_rft", base_to_new=True, max_new_tokens=6)
    assert set(result["datasets"]) == {"shapes/base", "shapes/new", "digits/base", "digits/new"}
    digits_new = result["datasets"]["digits/new"]
    assert digits_new["images"] == 40 and {a["solution"] for a in digits_new["answers"]} <= {
        "five", "six", "seven", "eight", "nine"}  # CoOp's rule: the second half of the classes is new
    score = get_reward("eval_visual_rft")
    for r in result["datasets"].values():  # every stored answer carries the protocol's own verdict
        assert [a["correct"] for a in r["answers"]] == score([a["text"] for a in r["answers"]],
                                                              [a["solution"] for a in r["answers"]])
        assert r["accuracy"] == pytest.approx(r["correct"] / r["images"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["base_to_new"]["shapes"]["H"] == pytest.approx(harmonic_mean(
        saved["datasets"]["shapes/base"]["accuracy"], saved["datasets"]["shapes/new"]["accuracy"]))
    assert "| **average** |" in (tmp_path / "eval.md").read_text()


def test_cli_eval_names_a_bad_model_path(tmp_path, capsys):
    assert main(["eval", str(DEFAULT_CONFIG), "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "is not a model folder" in capsys.readouterr().err


def test_eval_worker_loads_another_checkpoint_into_its_running_engine(tmp_path):
    """`clsrl transfer` evaluates each trained model on the same engines: after load(B) a worker started on
    A holds B's exact bytes and answers as a worker started on B does."""
    import torch
    from transformers import AutoModelForImageTextToText

    from actors.eval_worker import EvalWorker
    from tasks.data import load_run_data
    from vlm.processor import load_processor, save_processor

    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, ["rollout.prompts_per_call=4"])
    data = load_run_data(cfg)
    other = tmp_path / "other"
    model = AutoModelForImageTextToText.from_pretrained(data.model_path, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    save_processor(load_processor(data.model_path), other)

    scorers = {"shapes": "cls_equality"}
    worker = EvalWorker(data.model_path, cfg.rollout, scorers)
    fresh = EvalWorker(str(other), cfg.rollout, scorers)
    before = worker.engine.checksums()
    assert before != fresh.engine.checksums()
    assert worker.load(str(other)) == len(before) and worker.load(str(other)) == 0  # the second: no-op
    assert worker.engine.checksums() == fresh.engine.checksums()  # SHA-256 of every parameter's bytes

    requests = [RolloutRequest(e.id, e.inputs, e.solution, meta={"dataset": e.dataset}, source=e.source)
                for e in data.test_examples[:6]]
    assert [a.text for a in worker.answer(requests, 6)] == [a.text for a in fresh.answer(requests, 6)]
