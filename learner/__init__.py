"""clsrl learner: GRPO loss math (pure torch); import-light, no deepspeed/ray here."""

from learner.grpo import (
    aggregate,
    equal_reward_groups,
    expand_group_mask,
    group_advantages,
    kl_penalty,
    policy_loss,
)
from vlm.logprobs import token_entropy

__all__ = [
    "aggregate",
    "equal_reward_groups",
    "expand_group_mask",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "token_entropy",
]
