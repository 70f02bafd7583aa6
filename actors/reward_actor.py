"""The reward actor: a CPU process scoring completions with the configured composite reward.

Stateless, so the driver starts it with Ray restarts and task retries: a killed reward actor costs a retry,
never a sample.
"""
from __future__ import annotations

from collections.abc import Sequence

from protocol.components import RewardTerm
from rewards import CompositeReward


class RewardActor:
    def __init__(self, terms_by_dataset: dict[str, Sequence[RewardTerm]]) -> None:
        self.rewards = {name: CompositeReward(list(terms)) for name, terms in terms_by_dataset.items()}

    def score(self, dataset: str, texts: list[str], solutions: list, completion_lengths: list[int]
              ) -> tuple[list[float], dict[str, list[float]]]:
        """(total per completion, {component name: value per completion}) under `dataset`'s task rewards."""
        if dataset not in self.rewards:
            raise KeyError(f"no rewards configured for data set {dataset!r}; known: {sorted(self.rewards)}")
        return self.rewards[dataset](texts, solutions, completion_lengths=completion_lengths)

    def ping(self) -> bool:
        return True
