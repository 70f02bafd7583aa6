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
    """The G completions of one prompt, stamped with the policy version that produced them."""

    request: RolloutRequest
    completions: list[Completion]
    policy_version: int
    rewards: list[float] | None = None  # filled by the reward pool, one per completion
    reward_components: dict[str, list[float]] = field(default_factory=dict)


class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig,
                 seed: int | None = None) -> list[RolloutGroup]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int: ...
