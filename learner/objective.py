"""The training objectives on a model: GRPO on sampled completions, and the supervised warm start.

Both go through `vlm.logprobs.completion_logprobs`, the same function the rollout's behaviour log-probs
are checked against, so the learner scores exactly the tokens and pixels the engine produced.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.grpo import OFF_POLICY, policy_loss
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
    # Off-policy correction for stale (up to max_staleness versions) or engine-mismatched samples; mu = behaviour
    # (engine) policy, prox = this step's own log-probs, r = pi / prox. "ppo": clip(pi / mu) as ever.
    # "tis": -min(exp(prox - mu), is_cap) * min(r A, clip(r) A): truncated IS (Yao et al. 2025), which is decoupled
    # PPO (Hilton et al. 2021, AReaL) with a truncated weight; one optimizer step per batch makes r == 1, so the
    # clip is inert and the gradient is -w A grad(logp). See learner.grpo.policy_loss.
    off_policy: str = "ppo"
    is_cap: float = 2.0  # truncation C of the "tis" weight (Yao et al. use 2); > 0

    def __post_init__(self) -> None:
        if self.off_policy not in OFF_POLICY:
            hint = " (decoupled PPO with a truncated weight is 'tis')" if self.off_policy == "decoupled" else ""
            raise ValueError(f"algorithm.off_policy must be one of {OFF_POLICY}, got {self.off_policy!r}{hint}")
        if isinstance(self.is_cap, bool) or not isinstance(self.is_cap, int | float) or not self.is_cap > 0:
            raise ValueError(f"algorithm.is_cap must be a number > 0, got {self.is_cap!r}")


def grpo_objective(model, batch: SequenceBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   cfg: GRPOConfig, blocked_ids: Sequence[int], ref_logprobs: torch.Tensor | None = None,
                   max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO loss of one micro-batch; `old_logprobs` are the engine's behaviour log-probs, padded to [N, T]."""
    logprobs, mask, entropy = completion_logprobs(model, batch, cfg.temperature, blocked_ids, with_entropy=True)
    loss, stats = policy_loss(
        logprobs, old_logprobs.to(logprobs), advantages.to(logprobs), mask,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.to(logprobs), beta=cfg.beta,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl=cfg.kl, agg=cfg.loss_agg,
        entropy=entropy, max_len=max_len, off_policy=cfg.off_policy, is_cap=cfg.is_cap)
    with torch.no_grad():  # engine-vs-learner drift plus staleness: ~0 when on-policy with the same weights in fp32
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
