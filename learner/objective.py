"""The training objectives on a model: GRPO on sampled completions, and the supervised warm start.

Both go through `vlm.logprobs.completion_logprobs`, the same function the rollout's behaviour log-probs
are checked against, so the learner scores exactly the tokens and pixels the engine produced.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from learner.grpo import policy_loss
from protocol.components import GRPOConfig
from vlm.inputs import SequenceBatch
from vlm.logprobs import completion_logprobs


def grpo_objective(model, batch: SequenceBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   cfg: GRPOConfig, blocked_ids: Sequence[int], ref_logprobs: torch.Tensor | None = None,
                   max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO loss of one micro-batch; `old_logprobs` are the engine's behaviour log-probs, padded to
    [N, T]."""
    logprobs, mask, entropy = completion_logprobs(model, batch, cfg.temperature, blocked_ids,
                                                  with_entropy=True)
    loss, stats = policy_loss(
        logprobs, old_logprobs.to(logprobs), advantages.to(logprobs), mask,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.to(logprobs), beta=cfg.beta,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl=cfg.kl,
        agg=cfg.loss_agg, entropy=entropy, max_len=max_len, off_policy=cfg.off_policy, is_cap=cfg.is_cap)
    # engine-vs-learner drift plus staleness: ~0 when on-policy with the same weights in fp32
    with torch.no_grad():
        gap = (logprobs - old_logprobs.to(logprobs)).abs() * mask
        stats["logprob_gap"] = float(gap.sum() / mask.sum().clamp(min=1))
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
