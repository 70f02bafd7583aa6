"""Data order for multi-data-set runs: each step's k prompts are split across data sets by weight, and every
data set walks its own EpochOrder, so the whole state is one (epoch, position) per data set and a resumed run
neither repeats nor skips data.

How a step's k prompts are split (``MixtureOrder.counts``)
---------------------------------------------------------
Data set i has quota q_i = k * w_i / sum(w), computed exactly (``fractions.Fraction``). It gets floor(q_i)
prompts, and the r = k - sum(floor(q_i)) remaining seats go to r distinct data sets chosen by systematic
sampling on the fractional parts f_i = q_i - floor(q_i) (which sum to r): lay the f_i end to end on [0, r) in
sorted-name order and give a seat to every data set whose segment holds one of the points u, u + 1, ...,
u + r - 1. Every segment is shorter than 1, so it holds at most one point, and for u uniform on [0, 1) it
holds one with probability exactly f_i. Hence each step every count is floor(q_i) or ceil(q_i) (never off by
1 or more), the counts sum to k, and the expected count is exactly q_i.

u is a seeded quasi-random draw keyed on (seed, step): u_step = frac(u_0 + step * g), with u_0 derived from
the seed by SHA-256 and g = (sqrt(5) - 1) / 2, both as 64-bit fixed point (g is 0x9E3779B97F4A7C15 / 2**64),
so it is integer arithmetic and the same on every machine. Over the seed u_step is uniform (exact in
expectation, as above); over the steps the golden-ratio sequence is about as evenly spread as a sequence can
be. A data set gets its extra seat exactly when u_step falls in one arc of length f_i, so over any n
consecutive steps its total differs from n * q_i by at most the sequence's discrepancy: below 3.7 for
n <= 1,000 and 4.7 for n <= 10,000, growing like log(n) (independent random draws would drift by a standard
deviation of up to sqrt(n) / 2: 16 and 50). Holding every total within 1 would need the totals in the state,
or a replay from step 0; instead counts() is a pure function of (seed, step, k, weights): nothing about it
needs saving, and it is the same after a resume.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from tasks.order import EpochOrder

log = logging.getLogger(__name__)

_GOLDEN_64 = 0x9E3779B97F4A7C15  # round(2**64 * (sqrt(5) - 1) / 2), odd
_MASK_64 = (1 << 64) - 1


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def dataset_seed(seed: int, name: str) -> int:
    """Seed of data set `name`'s EpochOrder: derived from f"{seed}:{name}" so every data set gets its own
    orders."""
    return _hash64(f"{seed}:{name}")


def _names(names) -> str:
    return ", ".join(repr(n) for n in sorted(names))


class MixtureOrder:
    """Weighted mixture of data sets, each walking its own EpochOrder (every id once per epoch of that data
    set)."""

    def __init__(
        self, ids_by_dataset: dict[str, Sequence[str]], weights: dict[str, float], seed: int
    ) -> None:
        if not ids_by_dataset:
            raise ValueError("MixtureOrder needs at least one data set")
        if set(weights) != set(ids_by_dataset):
            problems = []
            if missing := set(ids_by_dataset) - set(weights):
                problems.append(f"no weight for data set(s) {_names(missing)}")
            if extra := set(weights) - set(ids_by_dataset):
                problems.append(f"weight given for unknown data set(s) {_names(extra)}")
            raise ValueError("; ".join(problems))
        self.seed = seed
        self.weights: dict[str, float] = {}
        owner: dict[str, str] = {}
        duplicates: dict[str, list[str]] = {}
        for name, ids in ids_by_dataset.items():
            w = weights[name]
            try:
                wf = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"data set {name!r}: weight {w!r} is not a number") from None
            if not math.isfinite(wf) or wf <= 0:
                raise ValueError(f"data set {name!r}: weight must be a finite number > 0, got {w!r}")
            self.weights[name] = wf
            if not ids:
                raise ValueError(f"data set {name!r} has no ids")
            if len(set(ids)) != len(ids):
                repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
                raise ValueError(f"data set {name!r} lists ids more than once: {repeated[:5]}")
            for i in ids:
                if i in owner:
                    duplicates.setdefault(i, [owner[i]]).append(name)
                else:
                    owner[i] = name
        if duplicates:
            shown = "; ".join(f"{i!r} in {_names(ns)}" for i, ns in sorted(duplicates.items())[:5])
            raise ValueError(f"ids must be unique across data sets (make them e.g. 'dataset/sample'); "
                             f"{len(duplicates)} shared: {shown}")
        self.orders: dict[str, EpochOrder] = {name: EpochOrder(ids, dataset_seed(seed, name))
                                              for name, ids in ids_by_dataset.items()}
        self._phase = _hash64(f"{seed}:mixture")
        self.calls = 0  # next_batch calls so far: the `step` of the next one
        self._quotas: dict[int, list[tuple[str, int, Fraction]]] = {}

    def _quota(self, k: int) -> list[tuple[str, int, Fraction]]:
        """(name, floor(q), frac(q)) per data set in sorted-name order, q = k * w / sum(w) exactly."""
        if k not in self._quotas:
            exact = {name: Fraction(w) for name, w in self.weights.items()}
            total = sum(exact.values())
            rows = []
            for name in sorted(exact):
                q = k * exact[name] / total
                rows.append((name, math.floor(q), q - math.floor(q)))
            self._quotas[k] = rows
        return self._quotas[k]

    def counts(self, k: int, step: int) -> dict[str, int]:
        """Prompts per data set at `step` (in ids_by_dataset order); see the module docstring for the
        scheme."""
        if k < 0 or step < 0:
            raise ValueError(f"k and step must be >= 0, got k={k}, step={step}")
        rows = self._quota(k)
        out = {name: base for name, base, _ in rows}
        seats = k - sum(out.values())
        if seats:
            u = Fraction((self._phase + step * _GOLDEN_64) & _MASK_64, 1 << 64)
            end, j = Fraction(0), 0
            for name, _, frac in rows:
                end += frac
                if j < seats and u + j < end:  # segment [end - frac, end) holds the point u + j
                    out[name] += 1
                    j += 1
            assert j == seats, (j, seats)
        return {name: out[name] for name in self.orders}

    def take(self, k: int, step: int) -> list[tuple[str, str]]:
        """This step's k prompts as (data set, id), grouped by data set in ids_by_dataset order; advances the
        orders."""
        return [(name, i) for name, n in self.counts(k, step).items() for i in self.orders[name].take(n)]

    def next_batch(self, k: int) -> list[str]:
        """The next k ids (the rollout scheduler's chunks): take(k, step) with step counting the calls."""
        batch = [i for _, i in self.take(k, self.calls)]
        self.calls += 1
        return batch

    def epochs(self) -> dict[str, float]:
        """Epochs consumed per data set (epoch + position / size), for logging."""
        return {name: o.epoch + o.position / len(o.ids) for name, o in self.orders.items()}

    def state_dict(self) -> dict:
        return {"datasets": {name: o.state_dict() for name, o in self.orders.items()}, "seed": self.seed,
                "calls": self.calls}

    def load_state_dict(self, state: dict, *, allow_new: bool = False, allow_removed: bool = False) -> None:
        """Restore every data set's (epoch, position); all or nothing.

        A data set of this run that the checkpoint lacks raises unless `allow_new` (it then starts at epoch 0,
        with a warning); a checkpointed data set that this run lacks raises unless `allow_removed` (it is then
        dropped).
        """
        saved = state.get("datasets")
        if not isinstance(saved, dict):
            raise ValueError(
                "mixture data order state has no 'datasets' mapping (a single-data-set checkpoint?)"
            )
        if state.get("seed") != self.seed:
            raise ValueError(f"mixture data order state has seed {state.get('seed')!r}; this run has seed "
                             f"{self.seed} (different train.seed?)")
        new = set(self.orders) - set(saved)
        removed = set(saved) - set(self.orders)
        if new and not allow_new:
            raise ValueError(f"data set(s) {_names(new)} not in the checkpoint's data order; pass "
                             "allow_new=True to start them at epoch 0")
        if removed and not allow_removed:
            raise ValueError(f"checkpoint has data order for data set(s) {_names(removed)} that this run "
                             "lacks; pass allow_removed=True to drop them")
        before = {name: (o.epoch, o.position) for name, o in self.orders.items()}
        try:
            for name, o in self.orders.items():
                if name in saved:
                    try:
                        o.load_state_dict(saved[name])
                    except ValueError as e:
                        raise ValueError(f"data set {name!r}: {e}") from e
                    except (KeyError, TypeError, AttributeError) as e:
                        raise ValueError(
                            f"data set {name!r}: malformed data order state ({type(e).__name__}: {e})"
                        ) from e
                    if not (o.epoch >= 0 and 0 <= o.position < len(o.ids)):
                        raise ValueError(f"data set {name!r}: bad epoch/position {o.epoch}/{o.position} for "
                                         f"{len(o.ids)} ids")
                else:
                    o.epoch, o.position = 0, 0
        except ValueError:
            for name, o in self.orders.items():
                o.epoch, o.position = before[name]
            raise
        self.calls = int(state.get("calls", 0))
        if new:
            log.warning("data order: data set(s) %s not in the checkpoint; starting them at epoch 0",
                        _names(new))
        if removed:
            log.warning("data order: dropping checkpointed data set(s) %s that this run lacks",
                        _names(removed))
