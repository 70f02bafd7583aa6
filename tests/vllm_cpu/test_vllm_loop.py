"""`clsrl train` with rollout.engine: vllm on the tiny Qwen2-VL with images: the whole loop (Ray actors, the
private Redis stream, DeepSpeed learners over gloo, the gloo weight broadcast into vLLM's workers, greedy
evals through vLLM) on vLLM's CPU build.

Engines equal learners: the learners recompute the behaviour log-probs vLLM reported for every sampled
token, images included, and the gap stays at float32 noise after every broadcast (`logprob_gap`, on steps
that trained on the latest version only); each broadcast also changes the engine's weights (embedding and
vision tower) and stamps its version.
"""
from __future__ import annotations

import json

import pytest
import ray

from cluster.driver import train
from cluster.job import Job
from commands.cli import DEFAULT_CONFIG
from protocol.config import ExperimentConfig
from protocol.overrides import load_config
from vlm.tiny import VLLM_CPU_SPEC

VLLM_LOOP = [
    "rollout.engine=vllm", "rollout.dtype=fp32", "rollout.gpu_memory_utilization=0.05", "rollout.max_model_len=512",
    "rollout.enforce_eager=true", "rollout.prompts_per_call=4",
    f"model.tiny.num_attention_heads={VLLM_CPU_SPEC.num_attention_heads}",
    f"model.tiny.num_key_value_heads={VLLM_CPU_SPEC.num_key_value_heads}",
    f"model.tiny.vision_hidden_size={VLLM_CPU_SPEC.vision_hidden_size}",
    "cluster.rollout_workers=1", "cluster.learner_ranks=1", "cluster.rendezvous_timeout_s=600", "train.warm_start_steps=2", "train.prompts_per_step=4",
    "train.eval_every=0", "train.save_every=0", "data.eval_limit=8", "sampling.n=4", "learner.micro_batch_size=4",
    "weight_sync.timeout_s=60",
    # the random model rarely names a class this early: the paper's length reward (small weight, L0 a few
    # tokens) keeps G samples' rewards apart, so dynamic sampling keeps groups and every step trains
    "task.rewards=[{name: cls_equality}, {name: length, weight: 0.1, params: {L0: 4}}]"]


def _run(tmp_path, monkeypatch, *extra: str) -> tuple[dict, list[dict], list[tuple[int, dict]]]:
    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, VLLM_LOOP + list(extra))
    seen, broadcast = [], Job.broadcast

    def checked(job: Job, version: int, *args, **kwargs):
        update = broadcast(job, version, *args, **kwargs)
        (info,) = ray.get([w.info.remote() for w in job.rollout_workers])
        (sums,) = ray.get([w.checksums.remote() for w in job.rollout_workers])
        seen.append((info["policy_version"], sums))
        return update

    monkeypatch.setattr(Job, "broadcast", checked)
    result = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, rows, seen


def _check(result: dict, rows: list[dict], seen: list[tuple[int, dict]], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(steps + 1))
    trained = rows[1:]
    # the gap also counts staleness (samples of an older version differ by design): steps that trained on
    # the latest weights only must show float32 noise
    on_policy = [r for r in trained if r["staleness/max"] == 0]
    assert on_policy and all(r["logprob_gap"] < 1e-4 for r in on_policy), [
        (r["staleness/max"], r["logprob_gap"]) for r in trained]
    assert all(r["reward/mean"] >= 0 and r["length/mean"] > 0 for r in trained)
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]  # greedy evals ran through vLLM
    assert result["final"] == rows[-1]["eval/accuracy"]
    versions = [v for v, _ in seen]
    assert versions[-steps:] == list(range(1, steps + 1)), versions
    # every broadcast changed the embedding and the vision tower's patch embedding inside vLLM's worker
    for (_, before), (_, after) in zip(seen, seen[1:]):
        for name in ("language_model.model.embed_tokens.weight", "visual.patch_embed.proj.weight"):
            assert before[name] != after[name], name


@pytest.mark.slow
def test_clsrl_train_with_vllm_and_images_synchronous(ray_local, tmp_path, monkeypatch):
    result, rows, seen = _run(tmp_path, monkeypatch, "train.steps=3")
    _check(result, rows, seen, 3)
    assert all(r["staleness/max"] == 0 for r in rows[1:])


@pytest.mark.slow
def test_clsrl_train_with_vllm_and_images_asynchronous(ray_local, tmp_path, monkeypatch):
    result, rows, seen = _run(tmp_path, monkeypatch, "train.steps=3", "rollout.max_staleness=1",
                              "rollout.prompts_per_call=2")
    _check(result, rows, seen, 3)
    assert max(r["staleness/max"] for r in rows[1:]) <= 1


@pytest.mark.slow
def test_clsrl_eval_with_vllm_gives_the_hf_engines_greedy_answers(ray_local, tmp_path):
    from commands.evaluation import run_eval

    results = {}
    for engine in ("vllm", "hf"):
        cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, VLLM_LOOP + [f"rollout.engine={engine}"])
        results[engine] = run_eval(cfg, tmp_path / engine)
    answers = {e: [(a["prompt_id"], a["text"]) for r in results[e]["datasets"].values() for a in r["answers"]]
               for e in results}
    assert len(answers["vllm"]) == 8  # data.eval_limit
    assert answers["vllm"] == answers["hf"]
    assert results["vllm"]["mean_accuracy"] == results["hf"]["mean_accuracy"]
    assert "| **mean** |" in (tmp_path / "vllm" / "eval.md").read_text()
