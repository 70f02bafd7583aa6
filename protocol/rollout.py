"""What travels between the parts of a run: an encoded prompt, a rollout request, and the scored group of G
completions that comes back (through the Redis stream to the learners)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PromptInputs:
    """One encoded prompt: 1-D token ids and the image as the processor resized it, in 8 bits, with its patch
    grid. The float patches (about 7x the bytes) are never carried: the engine and the learner each rebuild
    them from `image` with the same processor (vlm/inputs.py `image_patches`), so they get the same tensors.
    A text-only prompt (the text-only model that vLLM's CPU test runs) has neither image nor grid."""

    input_ids: torch.Tensor  # [L] long
    image: torch.Tensor | None = None  # [H, W, 3] uint8, H and W multiples of the patch size
    image_grid_thw: torch.Tensor | None = None  # [1, 3] long

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class PromptSource:
    """A prompt before it is encoded: what identifies it (the driver holds only these, never a split's
    pixels). The worker that uses it reads, resizes and encodes the image (tasks/examples.py
    `encode_source`)."""

    dataset: str
    image: str  # the image file
    text: str  # the question, chat template not yet applied
    min_pixels: int
    max_pixels: int
    skip_bad_images: bool = False  # unreadable past the start-up scan: skipped and counted, or an error


@dataclass
class Completion:
    token_ids: list[int]  # includes the end-of-turn token when the model stopped
    logprobs: list[float]  # behaviour log-probs, one per token
    text: str  # decoded with special tokens skipped (what rewards read)
    finish_reason: str  # "stop" or "length"
    # policy version that sampled each token; empty = all of them the group's policy_version. Several versions
    # when generation was interrupted by a weight update and continued under the new weights (partial
    # rollout).
    versions: list[int] = field(default_factory=list)


@dataclass
class RolloutRequest:
    prompt_id: str  # stable across epochs and retries: the unit of exactly-once accounting
    inputs: PromptInputs | None  # None until the worker encodes `source` (what the driver sends)
    solution: object = None  # passed through to the reward; the engine never reads it
    meta: dict = field(default_factory=dict)
    source: PromptSource | None = None  # not in the Redis stream: the groups there carry `inputs`


@dataclass
class RolloutGroup:
    """The G completions of one prompt, stamped with the policy version that produced them (with partial
    rollout: that of their first tokens; later ones may come from newer versions, see `version_span`)."""

    request: RolloutRequest
    completions: list[Completion]
    policy_version: int
    rewards: list[float] | None = None  # filled by the reward pool, one per completion
    reward_components: dict[str, list[float]] = field(default_factory=dict)

    @property
    def version_span(self) -> tuple[int, int]:
        """(oldest, newest) policy version that sampled a token of this group; staleness counts from the
        oldest."""
        ends = [v for c in self.completions for v in ((c.versions[0], c.versions[-1]) if c.versions
                                                       else (self.policy_version,))]
        return (min(ends), max(ends)) if ends else (self.policy_version, self.policy_version)
