"""The rollout-engine interface every backend (HF generate, vLLM) implements, and its data types."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vlm.generation import Completion, SamplingConfig
from vlm.inputs import PromptInputs


@dataclass
class RolloutRequest:
    prompt_id: str  # stable across epochs and retries: the unit of exactly-once accounting
    inputs: PromptInputs
    solution: object = None  # passed through to the reward; the engine never reads it
    meta: dict = field(default_factory=dict)


@dataclass
class RolloutGroup:
    """The G completions of one prompt, stamped with the policy version that produced them (with partial rollout:
    that of their first tokens; later ones may come from newer versions, see `version_span`)."""

    request: RolloutRequest
    completions: list[Completion]
    policy_version: int
    rewards: list[float] | None = None  # filled by the reward pool, one per completion
    reward_components: dict[str, list[float]] = field(default_factory=dict)

    @property
    def version_span(self) -> tuple[int, int]:
        """(oldest, newest) policy version that sampled a token of this group; staleness counts from the oldest."""
        ends = [v for c in self.completions for v in ((c.versions[0], c.versions[-1]) if c.versions
                                                       else (self.policy_version,))]
        return (min(ends), max(ends)) if ends else (self.policy_version, self.policy_version)


class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, seed: int | None = None,
                 interruptible: bool = True) -> list[RolloutGroup]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int: ...
