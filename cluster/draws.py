"""The exactly-once bookkeeping of rollout work, without Ray: which draws were issued, which worker holds
them, which were settled (trained on or dropped) and which go out again.

Each issued prompt is a *draw* (a run-wide counter): it is trained on once, or dropped and counted (stale,
filtered by dynamic sampling), never both and never twice. A dead worker's chunk is issued again to the
others (its engine rejoins at the next weight broadcast); learners drop the second answer to a draw if both
arrive. cluster/scheduler.py is the thin Ray shell that sends what this ledger assigns.
"""
from __future__ import annotations

from collections import deque

from cluster.staleness import StalenessManager
from protocol.results import RolloutSummary
from tasks.mixture import MixtureOrder

MAX_FILTERED_IN_A_ROW = 1000  # groups; beyond this dynamic sampling is not finding signal, it is spinning

Draw = tuple[int, str]  # (draw number, prompt id)


class DrawLedger:
    def __init__(self, order: MixtureOrder, staleness: StalenessManager, chunk: int, workers: int,
                 next_draw: int = 0, reissue: list[Draw] | None = None) -> None:
        self.order = order
        self.staleness = staleness
        self.chunk = chunk  # prompts per rollout call
        self.workers = workers
        self.next_draw = next_draw
        self.outstanding: dict[int, str] = {}  # draw -> prompt id: issued, not yet trained or dropped
        self.reissue: deque[Draw] = deque(reissue or [])
        self.held: dict[int, list[Draw]] = {}  # worker -> the chunk it is working on
        self.dead: set[int] = set()  # workers that died since the last weight-group re-form
        self.again: set[int] = set()  # draws issued more than once (a dead worker's)
        self.filtered_in_a_row = 0

    def assign(self, version: int) -> list[tuple[int, list[Draw]]]:
        """Chunks for idle live workers, while the staleness budget at `version` allows."""
        out = []
        for worker in range(self.workers):
            if worker in self.held or worker in self.dead:
                continue
            n = min(self.chunk, self.staleness.capacity(version))
            if n <= 0:
                break
            draws = [self.reissue.popleft() for _ in range(min(n, len(self.reissue)))]
            fresh = n - len(draws)
            for prompt_id in self.order.next_batch(fresh) if fresh else []:
                draws.append((self.next_draw, prompt_id))
                self.next_draw += 1
            self.staleness.start(len(draws))
            self.outstanding.update(draws)
            self.held[worker] = draws
            out.append((worker, draws))
        return out

    def completed(self, worker: int, summary: RolloutSummary) -> None:
        """The worker's chunk is in the stream, except the groups dynamic sampling dropped at the source."""
        del self.held[worker]
        self.staleness.release(self.settle(summary.filtered, copies_ok=True))  # slots go to replacements
        if summary.published:
            self.filtered_in_a_row = 0
        else:
            self.filtered_in_a_row += len(summary.filtered)
        if self.filtered_in_a_row > MAX_FILTERED_IN_A_ROW:
            raise RuntimeError(f"dynamic sampling dropped {self.filtered_in_a_row} groups in a row: every "
                               f"group's rewards were all equal (reward always 0 or always 1?); check the "
                               f"reward and prompt, or set algorithm.dynamic_sampling=false")

    def died(self, worker: int) -> list[Draw]:
        """The worker died mid-call: the draws of its chunk not yet settled are queued to go out again
        (those it got into the stream before dying may have been trained on already); returns them."""
        draws = [(d, p) for d, p in self.held.pop(worker) if d in self.outstanding]
        self.staleness.release(len(draws))
        self.reissue.extend(draws)
        for draw, _ in draws:
            del self.outstanding[draw]
        self.again.update(d for d, _ in draws)
        self.dead.add(worker)
        return draws

    def revive(self) -> list[int]:
        """Workers that died are back (Ray restarted them and they rejoined): assign to them again."""
        back = sorted(self.dead)
        self.dead.clear()
        return back

    def settle(self, draws: list[int], copies_ok: bool = False) -> int:
        """Draws that are done: trained on or dropped; returns how many were still open. A draw done twice
        is a bug worth stopping for, except a second copy of a re-issued draw when `copies_ok` (dynamic
        sampling dropped it at the source; the learners' claim keeps a second copy from being trained)."""
        unknown, settled = [], 0
        for d in draws:
            if self.outstanding.pop(d, None) is not None:
                settled += 1
                continue
            queued = next((x for x in self.reissue if x[0] == d), None)
            if queued is not None:  # the dead worker's copy counted after all: no need to issue it again
                self.reissue.remove(queued)
                self.staleness.start(1)  # its slot was given back when the worker died
                settled += 1
            elif not (copies_ok and d in self.again):
                unknown.append(d)
        if unknown:
            raise RuntimeError(f"draws {unknown[:5]} were trained on or dropped twice, or never issued")
        return settled

    def forget_below(self) -> int:
        """Smallest draw that may still arrive in the stream: open, queued, or held by a worker (a chunk
        issued again may hold a draw whose first copy was trained already; its second copy must still meet
        the learners' claim). Re-issued draws below it are forgotten too: no copy of them is left to come."""
        live = list(self.outstanding) + [d for d, _ in self.reissue]
        live += [d for chunk in self.held.values() for d, _ in chunk]
        low = min(live) if live else self.next_draw
        self.again = {d for d in self.again if d >= low}
        return low

    @property
    def busy(self) -> bool:
        return bool(self.held)

    def state_dict(self) -> dict:
        """Issued-but-untrained draws are issued again on resume (the stream is cleared then)."""
        pending = sorted(self.outstanding.items()) + list(self.reissue)
        return {"order": self.order.state_dict(), "next_draw": self.next_draw, "reissue": pending}
