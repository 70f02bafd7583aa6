"""A rollout worker: one engine, its end of the weight-sync group, and a producer on the Redis stream.

The driver sends it prompts; it samples G completions per prompt, has the reward pool score them and appends
each scored group to the stream, so rollouts never pass through the driver. Hosted as a Ray actor.
"""
from __future__ import annotations

import os
import random
import time

import torch

from actors.engine import make_engine
from actors.eval_worker import greedy_answers
from protocol.components import RedisConfig, SamplingConfig, WeightSyncConfig
from protocol.rollout import RolloutGroup, RolloutRequest
from rewards import get_reward
from stream.buffer import RolloutBuffer


class RolloutWorker:
    def __init__(self, rank: int, model_path: str, sampling: SamplingConfig, rollout, redis_url: str,
                 redis_cfg: RedisConfig, reward_actors: list, correct_reward: dict[str, str],
                 trust_remote_code: bool = False, drop_equal_groups: bool = False, seed: int = 0) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.rank, self.name = rank, f"rollout-{rank} (pid {os.getpid()})"
        self.engine = make_engine(rollout, model_path, trust_remote_code, seed + rank)
        self.sampling, self.prompts_per_call = sampling, rollout.prompts_per_call
        self.buffer = RolloutBuffer.from_config(redis_cfg, redis_url)
        self.reward_actors = reward_actors
        self.correct = {dataset: get_reward(name) for dataset, name in correct_reward.items()}  # eval scoring
        self.drop_equal_groups = drop_equal_groups  # dynamic sampling: such groups have zero advantage everywhere
        self.sync_timeout_s = 60.0

    # ---- weights ----

    def join_weight_group(self, host: str, port: int, first_rank: int, num_ranks: int, cfg: WeightSyncConfig) -> str:
        """Leave any previous group and join the one at host:port (blocks until the group forms)."""
        self.sync_timeout_s = cfg.timeout_s
        self.engine.join_weight_group(host, port, first_rank, num_ranks, cfg, self.name)
        return self.name

    def receive_weights(self) -> dict:
        t0 = time.perf_counter()
        stats = self.engine.receive_weights(self.sync_timeout_s * 3)
        return {**stats, "seconds": time.perf_counter() - t0}

    # ---- colocated mode (rollout.colocate: the engine shares a learner rank's GPU) ----

    def sleep(self) -> None:
        self.engine.sleep()

    def load_ipc(self, handles: list, version: int) -> dict:
        t0 = time.perf_counter()
        return {"version": version, "tensors": self.engine.load_ipc(handles, version), "seconds": time.perf_counter() - t0}

    # ---- rollout ----

    def _score(self, groups: list[RolloutGroup]) -> None:
        """One call per data set in the chunk (each has its own rewards), all in flight at once."""
        import ray

        by_dataset: dict[str, list[RolloutGroup]] = {}
        for g in groups:
            by_dataset.setdefault(g.request.meta["dataset"], []).append(g)
        calls = []
        for j, (dataset, gs) in enumerate(by_dataset.items()):
            comps = [(g, c) for g in gs for c in g.completions]
            actor = self.reward_actors[(self.rank + j) % len(self.reward_actors)]  # Ray retries if that actor dies
            calls.append((gs, actor.score.remote(dataset, [c.text for _, c in comps], [g.request.solution for g, _ in comps],
                                                 [len(c.token_ids) for _, c in comps])))
        for gs, ref in calls:
            totals, parts = ray.get(ref)
            i = 0
            for g in gs:
                k = len(g.completions)
                g.rewards = totals[i:i + k]
                g.reward_components = {name: vals[i:i + k] for name, vals in parts.items()}
                i += k

    def rollout(self, requests: list[RolloutRequest], seed: int) -> dict:
        """Sample, score and publish groups for `requests`; returns what the driver logs (no tensors)."""
        times = {"generate": 0.0, "reward": 0.0, "publish": 0.0}
        summary: dict = {"published": [], "filtered": [], "lengths": [], "truncated": 0, "version_spans": [],
                         "datasets": {}}  # per data set: rewards and reward components (the overall ones derive from them)
        for start in range(0, len(requests), self.prompts_per_call):
            t0 = time.perf_counter()
            groups = self.engine.generate(requests[start:start + self.prompts_per_call], self.sampling,
                                          seed=random.Random(f"{seed}:{start}").getrandbits(48))
            t1 = time.perf_counter()
            self._score(groups)
            t2 = time.perf_counter()
            keep, filtered = [], []
            for g in groups:
                (filtered if self.drop_equal_groups and len(set(g.rewards)) == 1 else keep).append(g)
            self.buffer.put_many(keep)  # all or nothing: a kill mid-call publishes none of them
            times["generate"] += t1 - t0
            times["reward"] += t2 - t1
            times["publish"] += time.perf_counter() - t2
            summary["published"] += [g.request.meta.get("draw") for g in keep]
            summary["filtered"] += [g.request.meta.get("draw") for g in filtered]
            for g in groups:
                per = summary["datasets"].setdefault(g.request.meta["dataset"], {"rewards": [], "components": {}})
                per["rewards"] += g.rewards
                for name, vals in g.reward_components.items():
                    per["components"].setdefault(name, []).extend(vals)
                summary["lengths"] += [len(c.token_ids) for c in g.completions]
                summary["truncated"] += sum(c.finish_reason == "length" for c in g.completions)
                summary["version_spans"].append(g.version_span[1] - g.version_span[0])
        summary["times"] = times
        summary["policy_version"] = self.engine.policy_version
        return summary

    def evaluate(self, requests: list[RolloutRequest], max_new_tokens: int) -> list[dict]:
        """Greedy answers, scored by each data set's correctness reward (1 = correct)."""
        return greedy_answers(self.engine, self.correct, requests, max_new_tokens, self.prompts_per_call)

    def checksums(self) -> dict[str, float]:
        """Per-parameter float64 sums, comparable with the learner's."""
        return self.engine.checksums()

    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "policy_version": self.engine.policy_version}

    def close(self) -> None:
        self.engine.leave_weight_group()
        self.buffer.close()
