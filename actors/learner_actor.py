"""A learner rank as a Ray actor: consumes its share of rollout groups from Redis, trains, acks, and (rank 0)
broadcasts the new weights to the engines.

Created empty so the driver can ask rank 0 for a rendezvous address first, then `setup` on every rank.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from learner.allocator import check_allocator, loaded_allocator
from learner.deepspeed_setup import import_deepspeed
from learner.grpo import group_advantages
from protocol.components import GRPOConfig, LearnerConfig, RedisConfig, WeightSyncConfig
from protocol.results import LearnerStep, SFTStep, WeightUpdate
from stream.buffer import RolloutBuffer
from telemetry.collapse import group_answer_shares
from telemetry.timer import StageTimer
from weights.network import bind_collectives, listen_port
from weights.sender import WeightSender

if TYPE_CHECKING:  # the driver imports this module to create the actor: transformers only where it runs
    from learner.worker import LearnerWorker


class LearnerActor:
    def __init__(self, rank: int, world_size: int) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.rank, self.world_size = rank, world_size
        self.worker: LearnerWorker | None = None
        self.buffer: RolloutBuffer | None = None
        self.sender: WeightSender | None = None
        self.shared: list[torch.Tensor] = []  # colocated: tensors whose IPC handles an engine is mapping

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it (rank 0's answer is the DeepSpeed rendezvous)."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, listen_port(host)

    def network(self) -> dict:
        """Where this rank runs and the interface its collectives bind to (chosen here, before any group
        forms: gloo and NCCL read it when a group is created)."""
        import ray

        node_ip = ray.util.get_node_ip_address()
        interface, source = bind_collectives(node_ip)
        return {"rank": self.rank, "node": node_ip, "interface": interface, "source": source}

    def allocator(self) -> str:
        """The malloc this rank's process runs on (learner.allocator)."""
        return loaded_allocator()

    def rendezvous(self, master_addr: str, master_port: int, collective_timeout_s: float) -> None:
        """Form the learners' default group (DeepSpeed's), so a rendezvous that cannot complete shows on its
        own, within the driver's bound, not as a model load that never ends. LearnerWorker then finds the
        group formed (deepspeed.init_distributed is a no-op the second time)."""
        deepspeed = import_deepspeed()

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          LOCAL_WORLD_SIZE="1", MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(seconds=collective_timeout_s))

    def setup(self, master_addr: str, master_port: int, model_path: str, cfg: LearnerConfig, algo: GRPOConfig,
              samples_per_rank: int, total_steps: int, redis_url: str, redis_cfg: RedisConfig,
              trust_remote_code: bool = False) -> None:
        import ray

        from learner.worker import LearnerWorker

        check_allocator(cfg.allocator, f"learner rank {self.rank} on node {ray.util.get_node_ip_address()}")
        self.algo = algo
        self.worker = LearnerWorker(self.rank, self.world_size, master_addr, master_port, model_path, cfg,
                                    algo, samples_per_rank, total_steps, trust_remote_code)
        if torch.cuda.is_available():  # loading's scratch blocks: free before a colocated engine measures
            torch.cuda.empty_cache()
        # a stable consumer name: a restarted rank finds its own unacked entries again
        self.buffer = RolloutBuffer.from_config(redis_cfg, redis_url, consumer=f"learner-{self.rank}")
        self.buffer.ensure_group()

    # ---- training ----

    def _take(self, n: int, version: int, max_staleness: int, timeout_s: float) -> tuple[list, dict]:
        """n fresh, unseen groups from the stream; stale ones and duplicates are acked away and counted."""
        got: list = []
        dropped: dict = {"duplicate": 0, "stale_draws": []}
        deadline = time.monotonic() + timeout_s
        while len(got) < n:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise TimeoutError(f"learner rank {self.rank}: {len(got)} of {n} rollout groups arrived in "
                                   f"the stream {self.buffer.stream!r} within {timeout_s:.0f}s")
            taken = self.buffer.take(n - len(got), block_ms=min(left_ms, 1000))
            # the first copy of a draw decides it, fresh or stale; a re-issued draw's second copy is dropped
            firsts = self.buffer.claim([g.request.meta.get("draw", -1) for _, g in taken])
            drop = [eid for (eid, _), first in zip(taken, firsts) if not first]
            stale = []
            for (eid, g), first in zip(taken, firsts):
                if not first:
                    continue
                if version - g.version_span[0] <= max_staleness:  # from the oldest token (partial rollout)
                    got.append((eid, g))
                else:
                    drop.append(eid)
                    stale.append(g.request.meta.get("draw"))
            dropped["stale_draws"] += stale
            dropped["duplicate"] += len(taken) - sum(firsts)
            if drop:
                self.buffer.ack(drop)
                # the driver issues replacements for stale slots (a duplicate's draw was trained already)
                self.buffer.add_released(len(stale))
        return got, dropped

    def _advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        if self.algo.advantage_scale != "batch":
            return group_advantages(rewards, group_size, self.algo.advantage_scale, self.algo.advantage_eps)
        # batch scale: the std of every rank's rewards, so the result does not depend on how groups were split
        moments = torch.tensor([rewards.sum(), (rewards ** 2).sum(), rewards.numel()], dtype=torch.float64)
        dist.all_reduce(moments)
        total, sq, count = moments.tolist()
        std = ((sq - total * total / count) / max(count - 1, 1)) ** 0.5
        return group_advantages(rewards, group_size, "none") / (std + self.algo.advantage_eps)

    def train(self, n_groups: int, version: int, max_staleness: int, max_len: int | None,
              take_timeout_s: float, forget_below: int = 0,
              correct_reward: dict[str, str] | None = None) -> LearnerStep:
        """Take n_groups fresh groups, run one optimizer step on them, ack them; returns this rank's stats.

        `version` is the policy version this rank holds; `forget_below` prunes the duplicate filter to draws
        that may still arrive.
        """
        timer = StageTimer()
        with timer("take"):
            if forget_below:
                self.buffer.forget_claims(forget_below)
            taken, dropped = self._take(n_groups, version, max_staleness, take_timeout_s)
        groups = [g for _, g in taken]
        sizes = {len(g.completions) for g in groups}
        if len(sizes) != 1 or any(g.rewards is None for g in groups):
            raise ValueError(f"learner rank {self.rank}: groups must be scored and equally sized, got "
                             f"sizes {sizes}")
        with timer("train_step"):
            rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
            adv = self._advantages(rewards, sizes.pop()).float().view(len(groups), -1)
            stats = self.worker.train_step([(g, a.tolist()) for g, a in zip(groups, adv)], max_len)
            self.buffer.ack([eid for eid, _ in taken])  # only after the optimizer step: a crash loses nothing
        # correctness per completion: the data set's correct_reward component (else the total reward)
        names = correct_reward or {}
        answers = group_answer_shares([
            ([c.text for c in g.completions],
             g.reward_components.get(names.get(g.request.meta.get("dataset"), ""), g.rewards))
            for g in groups])
        return LearnerStep(
            stats=stats,
            draws=[g.request.meta.get("draw") for g in groups],
            prompt_ids=[g.request.prompt_id for g in groups],
            staleness=[version - g.version_span[0] for g in groups],
            stale_draws=dropped["stale_draws"],
            duplicates=dropped["duplicate"],
            equal_rewards=sum(len(set(g.rewards)) == 1 for g in groups) / len(groups),
            take_seconds=timer.seconds["take"],
            step_seconds=timer.seconds["train_step"],
            buffer=self.buffer.metrics(),
            one_answer=answers["groups/one_answer"],
            one_wrong_answer=answers["groups/one_wrong_answer"],
        )

    def sft_train(self, rows: list[tuple]) -> SFTStep:
        """One supervised step on (PromptInputs, target text) pairs (train.mode: sft)."""
        start = time.perf_counter()
        stats = self.worker.sft_step(rows)
        return SFTStep(stats=stats, step_seconds=time.perf_counter() - start)

    # ---- weight broadcast (rank 0 hosts the group; every rank walks the parameters for ZeRO-3 gathers) ----

    def open_weight_group(self, num_engines: int, cfg: WeightSyncConfig) -> tuple[str, int]:
        if self.sender is not None:
            self.sender.close()
        import ray

        host = ray.util.get_node_ip_address()
        self.sender = WeightSender(host, 0, num_engines, cfg, connect=False)
        return host, self.sender.port

    def connect_weight_group(self) -> None:
        self.sender.connect()

    def broadcast(self, version: int) -> WeightUpdate | None:
        """Rank 0 sends and reports the transfer; the other ranks only take part in ZeRO-3's gathers."""
        params = self.worker.sync_parameters(trainable_only=self.worker.cfg.freeze_vision)
        if self.rank != 0:
            for _ in params:  # ZeRO-3: gather in lockstep with rank 0; otherwise a no-op walk
                pass
            return None
        stats = self.sender.broadcast(params, version)
        return WeightUpdate(version=stats["version"], bytes=stats["bytes"], tensors=stats["tensors"],
                            seconds=stats["seconds"], mb_per_s=stats["mb_per_s"])

    def share_weights(self) -> tuple[list, int]:
        """Colocated mode: this rank's weights as IPC handles for the engine on its GPU, and their bytes
        (every rank at once: ZeRO-3 gathers in lockstep). The tensors stay alive until release_shared()."""
        from weights.ipc import share

        # every weight, frozen ones too: a sleeping vLLM engine (level 2) dropped all of its weights, so
        # sending only the trainable ones would wake it with a garbage vision tower
        params = self.worker.sync_parameters(trainable_only=False)
        handles, self.shared = share(params)
        if torch.cuda.is_available():  # the engine wakes next: the step's freed blocks go back to it
            torch.cuda.empty_cache()
        return handles, sum(t.numel() * t.element_size() for t in self.shared)

    def release_shared(self) -> None:
        self.shared = []

    # ---- checkpoints ----

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        self.worker.save_checkpoint(ckpt_dir, tag, client_state)

    def load(self, ckpt_dir: str, tag: str) -> dict:
        return self.worker.load_checkpoint(ckpt_dir, tag)

    def checksums(self) -> dict[str, str]:
        return self.worker.parameter_checksums()

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.buffer is not None:
            self.buffer.close()
        if self.worker is not None:
            self.worker.close()
