"""A rollout worker: one engine, its end of the weight-sync group, and a producer on the Redis stream.

The driver sends it prompts; it samples G completions per prompt, has the reward pool score them and appends
each scored group to the stream, so rollouts never pass through the driver. Hosted as a Ray actor.
"""
from __future__ import annotations

import os
import random
import time

import ray
import torch

from actors.engine import make_engine
from actors.eval_worker import correctness_rewards, greedy_answers
from protocol.components import RedisConfig, SamplingConfig, WeightSyncConfig
from protocol.config import RolloutConfig
from protocol.results import DatasetRewards, EvalAnswer, RolloutSummary
from protocol.rollout import RolloutGroup, RolloutRequest
from stream.buffer import RolloutBuffer
from tasks.examples import RequestEncoder
from telemetry.timer import StageTimer


class RolloutWorker:
    def __init__(self, rank: int, model_path: str, sampling: SamplingConfig, rollout: RolloutConfig,
                 redis_url: str, redis_cfg: RedisConfig, reward_actors: list, correct_reward: dict[str, str],
                 trust_remote_code: bool = False, drop_equal_groups: bool = False, seed: int = 0) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.rank = rank
        self.name = f"rollout-{rank} (pid {os.getpid()})"
        self.engine = make_engine(rollout, model_path, trust_remote_code, seed + rank)
        self.encode = RequestEncoder(model_path, trust_remote_code)  # reads the images of the prompts it gets
        self.sampling = sampling
        self.prompts_per_call = rollout.prompts_per_call
        self.buffer = RolloutBuffer.from_config(redis_cfg, redis_url)
        self.reward_actors = reward_actors
        self.correct = correctness_rewards(correct_reward)
        # dynamic sampling: a group whose rewards are all equal has zero advantage everywhere
        self.drop_equal_groups = drop_equal_groups
        self.sync_timeout_s = 60.0

    # ---- weights ----

    def join_weight_group(self, host: str, port: int, first_rank: int, num_ranks: int,
                          cfg: WeightSyncConfig) -> str:
        """Leave any previous group and join the one at host:port (blocks until the group forms)."""
        self.sync_timeout_s = cfg.timeout_s
        self.engine.join_weight_group(host, port, first_rank, num_ranks, cfg, self.name)
        return self.name

    def receive_weights(self) -> dict:
        start = time.perf_counter()
        stats = self.engine.receive_weights(self.sync_timeout_s * 3)
        return {**stats, "seconds": time.perf_counter() - start}

    # ---- colocated mode (rollout.colocate: the engine shares a learner rank's GPU) ----

    def sleep(self) -> None:
        self.engine.sleep()

    def load_ipc(self, handles: list, version: int) -> int:
        """Tensors loaded from the learner rank's IPC handles."""
        return self.engine.load_ipc(handles, version)

    # ---- rollout ----

    def _score(self, groups: list[RolloutGroup]) -> None:
        """One call per data set in the chunk (each has its own rewards), all in flight at once."""
        by_dataset: dict[str, list[RolloutGroup]] = {}
        for g in groups:
            by_dataset.setdefault(g.request.meta["dataset"], []).append(g)
        calls = []
        for j, (dataset, gs) in enumerate(by_dataset.items()):
            pairs = [(g, c) for g in gs for c in g.completions]
            actor = self.reward_actors[(self.rank + j) % len(self.reward_actors)]  # Ray retries if it dies
            texts = [c.text for _, c in pairs]
            solutions = [g.request.solution for g, _ in pairs]
            lengths = [len(c.token_ids) for _, c in pairs]
            calls.append((gs, actor.score.remote(dataset, texts, solutions, lengths)))
        for gs, ref in calls:
            totals, parts = ray.get(ref)
            i = 0
            for g in gs:
                k = len(g.completions)
                g.rewards = totals[i:i + k]
                g.reward_components = {name: vals[i:i + k] for name, vals in parts.items()}
                i += k

    def rollout(self, requests: list[RolloutRequest], seed: int) -> RolloutSummary:
        """Sample, score and publish groups for `requests`; returns what the driver logs (no tensors)."""
        timer = StageTimer()
        summary = RolloutSummary()
        for start in range(0, len(requests), self.prompts_per_call):
            with timer("encode"):  # this chunk's images only: a worker never holds more
                chunk, skipped = self.encode(requests[start:start + self.prompts_per_call])
            summary.filtered += [r.meta.get("draw") for r, _ in skipped]  # settled: no group will come
            summary.bad_images += [message for _, message in skipped]
            if not chunk:
                continue
            with timer("generate"):
                chunk_seed = random.Random(f"{seed}:{start}").getrandbits(48)
                groups = self.engine.generate(chunk, self.sampling, seed=chunk_seed)
            with timer("reward"):
                self._score(groups)
            keep = [g for g in groups if not (self.drop_equal_groups and len(set(g.rewards)) == 1)]
            with timer("publish"):
                self.buffer.put_many(keep)  # all or nothing: a kill mid-call publishes none of them
            kept = {id(g) for g in keep}
            summary.published += [g.request.meta.get("draw") for g in keep]
            summary.filtered += [g.request.meta.get("draw") for g in groups if id(g) not in kept]
            for g in groups:
                add_group(summary, g)
        summary.seconds = timer.seconds
        summary.policy_version = self.engine.policy_version
        return summary

    def evaluate(self, requests: list[RolloutRequest], max_new_tokens: int) -> list[EvalAnswer]:
        """Greedy answers, scored by each data set's correctness reward (1 = correct)."""
        return greedy_answers(self.engine, self.correct, requests, max_new_tokens, self.prompts_per_call,
                              self.encode)

    def checksums(self) -> dict[str, str]:
        """The engine's SHA-256 per parameter (weights/checksum.py), comparable with the learner's."""
        return self.engine.checksums()

    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "policy_version": self.engine.policy_version}

    def close(self) -> None:
        self.engine.leave_weight_group()
        self.buffer.close()


def add_group(summary: RolloutSummary, group: RolloutGroup) -> None:
    """Count one scored group into the summary: rewards per data set, lengths, truncation, version span."""
    per = summary.datasets.setdefault(group.request.meta["dataset"], DatasetRewards())
    per.rewards += group.rewards
    for name, values in group.reward_components.items():
        per.components.setdefault(name, []).extend(values)
    summary.lengths += [len(c.token_ids) for c in group.completions]
    summary.truncated += sum(c.finish_reason == "length" for c in group.completions)
    oldest, newest = group.version_span
    summary.version_spans.append(newest - oldest)
