"""Epoch-wise shuffled data order whose whole state is (epoch, position): resumable without pickled RNG
state."""
from __future__ import annotations

import random
from collections.abc import Sequence


class EpochOrder:
    """Every id once per epoch, in an order fixed by (seed, epoch); batches run across epoch boundaries."""

    def __init__(self, ids: Sequence[str], seed: int) -> None:
        if not ids:
            raise ValueError("EpochOrder needs at least one id")
        if len(set(ids)) != len(ids):
            raise ValueError("EpochOrder ids must be unique")
        self.ids, self.seed = sorted(ids), seed
        self.epoch, self.position = 0, 0

    def _permutation(self, epoch: int) -> list[str]:
        perm = list(self.ids)
        random.Random(f"{self.seed}:{epoch}").shuffle(perm)
        return perm

    def take(self, k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            perm = self._permutation(self.epoch)
            grab = perm[self.position:self.position + k - len(out)]
            out += grab
            self.position += len(grab)
            if self.position == len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.ids), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.ids) or state.get("seed") != self.seed:
            raise ValueError(f"data order state is for {state.get('size')} ids with seed "
                             f"{state.get('seed')}; this run has {len(self.ids)} ids with seed {self.seed} "
                             f"(different data or train.seed?)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
