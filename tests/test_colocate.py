"""Colocated mode through the real loop on CPU with the HF engine: engine i lives in learner rank i's placement
bundle, sleeps while the learners train and takes each version from learner rank i's tensor handles instead
of the broadcast. (On CPU the handles travel as copies; CUDA IPC and vLLM's sleep/wake need a GPU.)"""
from __future__ import annotations

import json

import pytest
import ray

import cluster.job
from cluster.driver import train
from cluster.job import Job
from commands.cli import DEFAULT_CONFIG
from protocol.config import ExperimentConfig
from protocol.overrides import load_config


@pytest.mark.slow
def test_colocated_run_keeps_engines_equal_to_their_learner_after_every_step(ray_local, tmp_path, monkeypatch):
    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, [
        "rollout.colocate=true", "train.steps=3", "train.warm_start_steps=0", "train.prompts_per_step=4",
        "train.eval_every=0", "train.save_every=0", "data.eval_limit=4", "sampling.n=4", "learner.micro_batch_size=4",
        "algorithm.dynamic_sampling=false",  # no warm start: every group all wrong, nothing to keep
        # frozen vision tower: still sent every time (a GPU engine's level-2 sleep drops all its weights)
        "learner.freeze_vision=true"])
    checks, share, sleep, slept, sent = [], cluster.job.share_colocated, Job.sleep_engines, [], []

    def checked(learner_actors: list, workers: list, version: int):
        stats = share(learner_actors, workers, version)
        learners = ray.get([a.checksums.remote() for a in learner_actors])
        engines = ray.get([w.checksums.remote() for w in workers])
        infos = ray.get([w.info.remote() for w in workers])
        checks.append((version, [e == learners[0] for e in engines], [i["policy_version"] for i in infos]))
        sent.append((stats.tensors, len(learners[0])))
        return stats

    def counted_sleep(job: Job) -> None:
        slept.append(job.state.policy_version)
        sleep(job)

    def no_weight_group(job: Job) -> None:
        raise AssertionError("a colocated run must not form the broadcast group")

    events, await_started, start_rollout = [], Job._await_started, Job._start_rollout_workers

    def awaited(job: Job, starting: dict) -> None:
        await_started(job, starting)
        events.append(sorted(label.rsplit(" ", 1)[0] for label in starting.values()))

    def started_rollout(job: Job) -> None:
        events.append("rollout workers created")
        start_rollout(job)

    monkeypatch.setattr(Job, "_await_started", awaited)
    monkeypatch.setattr(Job, "_start_rollout_workers", started_rollout)
    monkeypatch.setattr(cluster.job, "share_colocated", checked)
    monkeypatch.setattr(Job, "form_weight_group", no_weight_group)
    monkeypatch.setattr(Job, "sleep_engines", counted_sleep)
    train(cfg, tmp_path)
    # engines are created only once the learners on their GPUs are up (vLLM measures free memory at start)
    assert events == [["learner rank", "learner rank", "reward actor"], "rollout workers created",
                      ["rollout worker", "rollout worker"]], events
    assert checks == [(v, [True, True], [v, v]) for v in range(4)]  # the start, then after each of 3 steps
    assert all(n == every for n, every in sent) and len(sent) == 4, sent  # every weight, frozen ones too
    assert slept == [0, 1, 2]  # once a step, after its samples were in (a later rollout would have raised: asleep)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["sync/mb"] > 0 and r["logprob_gap"] < 1e-4 for r in rows[1:])  # engines sampled with the learners' weights
