"""Issuing rollout work: every worker holds one chunk of prompts while the staleness budget allows.

Each issued prompt is a *draw* (a run-wide counter), the unit of exactly-once accounting: a draw is trained on
once, or dropped and counted (stale, filtered by dynamic sampling), never both and never twice. A dead worker's
chunk is issued again to the others (its engine rejoins at the next weight broadcast); learners drop the
second answer to a draw if both arrive.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import ray

from cluster.staleness import StalenessManager
from protocol.rollout import RolloutRequest
from tasks.mixture import MixtureOrder
from telemetry.logs import announce

MAX_FILTERED_IN_A_ROW = 1000  # groups; beyond this dynamic sampling is not finding signal, it is spinning


class RolloutScheduler:
    def __init__(self, workers: list, order: MixtureOrder, requests: Callable[[str, int], RolloutRequest],
                 staleness: StalenessManager, chunk: int,
                 seed: int, next_draw: int = 0, reissue: list[tuple[int, str]] | None = None) -> None:
        self.workers, self.order, self.requests = workers, order, requests
        self.staleness, self.chunk, self.seed = staleness, chunk, seed
        self.next_draw = next_draw
        self.outstanding: dict[int, str] = {}  # draw -> prompt id: issued, not yet trained or dropped
        self.reissue: deque[tuple[int, str]] = deque(reissue or [])
        self.inflight: dict = {}  # ObjectRef -> (worker index, draws)
        self.lost_workers: list[int] = []  # died since the last weight-group re-form
        self.dead: set[int] = set()
        self.filtered_in_a_row = 0

    def fill(self, version: int) -> None:
        busy = {w for w, _ in self.inflight.values()} | self.dead
        for w in (i for i in range(len(self.workers)) if i not in busy):
            n = min(self.chunk, self.staleness.capacity(version))
            if n <= 0:
                return
            draws = [self.reissue.popleft() for _ in range(min(n, len(self.reissue)))]
            for pid in self.order.next_batch(n - len(draws)) if n > len(draws) else []:
                draws.append((self.next_draw, pid))
                self.next_draw += 1
            self.staleness.start(len(draws))
            self.outstanding.update(draws)
            reqs = [self.requests(pid, d) for d, pid in draws]
            ref = self.workers[w].rollout.remote(reqs, seed=self.seed * 1_000_003 + draws[0][0])
            self.inflight[ref] = (w, draws)

    def poll(self, timeout_s: float) -> list[dict]:
        """Summaries of chunks that finished within timeout_s; a dead worker's chunk goes back to the queue."""
        if not self.inflight:
            return []
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout_s)
        out = []
        for ref in ready:
            w, draws = self.inflight.pop(ref)
            try:
                summary = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                announce(f"rollout worker {w} died ({type(err).__name__}); issuing its {len(draws)} prompts again, "
                         f"it rejoins the weight group at the next broadcast", "clsrl.scheduler", logging.WARNING)
                self.staleness.release(len(draws))
                self.reissue.extend(draws)
                for d, _ in draws:
                    self.outstanding.pop(d, None)
                self.dead.add(w)
                self.lost_workers.append(w)
                continue
            self.settle(summary["filtered"])  # dynamic sampling: dropped at the source, slots reused
            self.staleness.release(len(summary["filtered"]))
            self.filtered_in_a_row = 0 if summary["published"] else self.filtered_in_a_row + len(summary["filtered"])
            if self.filtered_in_a_row > MAX_FILTERED_IN_A_ROW:
                raise RuntimeError(f"dynamic sampling dropped {self.filtered_in_a_row} groups in a row: every group's "
                                   f"rewards were all equal (reward always 0 or always 1?); check the reward and prompt, "
                                   f"or set algorithm.dynamic_sampling=false")
            out.append(summary)
        return out

    def settle(self, draws: list[int]) -> None:
        """Draws that are done: trained on or dropped. A draw done twice is a bug worth stopping for."""
        unknown = [d for d in draws if self.outstanding.pop(d, None) is None]
        if unknown:
            raise RuntimeError(f"draws {unknown[:5]} were trained on or dropped twice, or never issued")

    def revive(self) -> list[int]:
        """Workers that died are back (Ray restarted them) and rejoined: schedule them again."""
        back, self.lost_workers = self.lost_workers, []
        self.dead.clear()
        return back

    def forget_below(self) -> int:
        """Smallest draw that may still arrive in the stream."""
        live = list(self.outstanding) + [d for d, _ in self.reissue]
        return min(live) if live else self.next_draw

    def state_dict(self) -> dict:
        """Issued-but-untrained draws are issued again on resume (the stream is cleared then)."""
        pending = sorted(self.outstanding.items()) + list(self.reissue)
        return {"order": self.order.state_dict(), "next_draw": self.next_draw, "reissue": pending}
