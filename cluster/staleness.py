"""How far rollout may run ahead of training: admission at the producer, freshness at the consumer.

Admission (AReaL's rule): while the learner holds version v, at most (v + max_staleness + 1) x
groups_per_step groups may have been started in total (dropped ones give their slot back). So every group is
trained on by the time the learner reaches version (its own + max_staleness), and `max_staleness: 0` is the
synchronous loop: the next batch starts only after the weights it must be sampled with have arrived.
Consumption: a group sampled with version v' and consumed at version v is fresh iff v - v' <= max_staleness;
stale ones (possible when workers finish out of order) are dropped and counted, never silently used.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessManager:
    groups_per_step: int
    max_staleness: int
    started: int = 0  # groups issued that still count toward training (issued minus dropped)

    def __post_init__(self) -> None:
        if self.groups_per_step < 1 or self.max_staleness < 0:
            raise ValueError(f"groups_per_step must be >= 1 and max_staleness >= 0, "
                             f"got {self.groups_per_step}, {self.max_staleness}")

    def capacity(self, version: int) -> int:
        """How many more groups may start now."""
        return max(0, (version + self.max_staleness + 1) * self.groups_per_step - self.started)

    def start(self, n: int) -> None:
        self.started += n

    def release(self, n: int) -> None:
        """Dropped (stale, filtered, or lost to a dead worker) groups: their slots go to replacements."""
        self.started -= n

    def is_fresh(self, sample_version: int, version: int) -> bool:
        return version - sample_version <= self.max_staleness
