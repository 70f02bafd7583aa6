"""The reward actor: a CPU process scoring completions with the configured composite reward.

Stateless, so the driver starts it with Ray restarts and task retries: a killed reward actor costs a retry,
never a sample.
"""
from __future__ import annotations

from collections.abc import Sequence

from rewards import CompositeReward
from rewards.composite import RewardTerm


class RewardActor:
    def __init__(self, terms: Sequence[RewardTerm]) -> None:
        self.reward = CompositeReward(list(terms))

    def score(self, texts: list[str], solutions: list, completion_lengths: list[int]
              ) -> tuple[list[float], dict[str, list[float]]]:
        """(total per completion, {component name: value per completion})."""
        return self.reward(texts, solutions, completion_lengths=completion_lengths)

    def ping(self) -> bool:
        return True
