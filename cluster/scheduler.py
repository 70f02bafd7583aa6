"""Issuing rollout work over Ray: every worker holds one chunk of prompts while the staleness budget allows.

The bookkeeping (which draws are out, settled, issued again) is cluster/draws.py's DrawLedger, tested without
Ray; this shell only sends its chunks and collects what comes back.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import ray

from cluster.draws import DrawLedger
from protocol.results import RolloutSummary
from protocol.rollout import RolloutRequest
from telemetry.logs import announce


class RolloutScheduler:
    def __init__(self, workers: list, ledger: DrawLedger, requests: Callable[[str, int], RolloutRequest],
                 seed: int) -> None:
        self.workers = workers
        self.ledger = ledger
        self.requests = requests  # (prompt id, draw) -> the request a worker gets
        self.seed = seed
        self.inflight: dict[ray.ObjectRef, int] = {}  # rollout call -> worker index

    def fill(self, version: int) -> None:
        """Idle workers get a chunk each while the staleness budget allows."""
        for worker, draws in self.ledger.assign(version):
            requests = [self.requests(prompt_id, draw) for draw, prompt_id in draws]
            call_seed = self.seed * 1_000_003 + draws[0][0]
            self.inflight[self.workers[worker].rollout.remote(requests, seed=call_seed)] = worker

    def poll(self, timeout_s: float) -> list[RolloutSummary]:
        """Summaries of calls that finished within timeout_s; a dead worker's chunk goes back to the queue."""
        if not self.inflight:
            return []
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout_s)
        out = []
        for ref in ready:
            worker = self.inflight.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                draws = self.ledger.died(worker)
                announce(f"rollout worker {worker} died ({type(err).__name__}); issuing its {len(draws)} "
                         f"prompts again, it rejoins the weight group at the next broadcast",
                         "clsrl.scheduler", logging.WARNING)
                continue
            self.ledger.completed(worker, summary)
            for message in summary.bad_images:  # found when the worker read it: skipped, settled, named here
                announce(f"rollout worker {worker} skipped an unreadable image (data.skip_bad_images): "
                         f"{message}", "clsrl.scheduler", logging.WARNING)
            out.append(summary)
        return out

    def refs(self) -> list[ray.ObjectRef]:
        return list(self.inflight)
