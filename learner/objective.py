"""The training objectives on a model: GRPO on sampled completions, and the supervised warm start.

Both go through `vlm.logprobs.completion_logprobs`, the same function the rollout's behaviour log-probs
are checked against, so the learner scores exactly the tokens and pixels the engine produced.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.grpo import policy_loss
from vlm.inputs import SequenceBatch
from vlm.logprobs import completion_logprobs


@dataclass
class GRPOConfig:
    """Maps onto the YAML `algorithm` section (defaults: the papers' GRPO)."""

    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    advantage_eps: float = 1e-6
    beta: float = 0.04  # KL coefficient; 0 skips the reference model entirely
    kl: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "seq-mean-token-mean"
    temperature: float = 1.0  # must equal sampling.temperature: the policy is the tempered distribution
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal


def grpo_objective(model, batch: SequenceBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   cfg: GRPOConfig, blocked_ids: Sequence[int], ref_logprobs: torch.Tensor | None = None,
                   max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO loss of one micro-batch; `old_logprobs` are the engine's behaviour log-probs, padded to [N, T]."""
    logprobs, mask, entropy = completion_logprobs(model, batch, cfg.temperature, blocked_ids, with_entropy=True)
    loss, stats = policy_loss(
        logprobs, old_logprobs.to(logprobs), advantages.to(logprobs), mask,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.to(logprobs), beta=cfg.beta,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl=cfg.kl, agg=cfg.loss_agg,
        entropy=entropy, max_len=max_len)
    with torch.no_grad():  # engine-vs-learner drift: ~0 when both run the same weights in fp32
        stats["logprob_gap"] = float(((logprobs - old_logprobs.to(logprobs)).abs() * mask).sum() / mask.sum().clamp(min=1))
    return loss, stats


def sft_objective(model, batch: SequenceBatch) -> torch.Tensor:
    """Token-mean cross-entropy of the completions (the warm start and the SFT baseline)."""
    logprobs, mask = completion_logprobs(model, batch)
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def pad_rows(rows: Sequence[Sequence[float]], width: int | None = None) -> torch.Tensor:
    """Ragged per-token values (e.g. behaviour log-probs) as a zero-padded [N, T] float tensor."""
    width = width if width is not None else max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.float32)
    return out
