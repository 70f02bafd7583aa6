"""GRPO advantages and policy loss, in plain torch.

Everything here is a pure function of tensors: no distributed code, no model.
The learner computes per-token log-probabilities however it likes and hands
them to :func:`policy_loss`; rollouts hand rewards to :func:`group_advantages`.

Conventions (shared with TRL, verl, EasyR1, OpenRLHF):

* A batch holds ``groups * group_size`` completions, each group's completions
  contiguous (sample ``i`` belongs to group ``i // group_size``).
* Per-token tensors are ``[N, T]`` (right-padded completions) with a boolean
  ``mask`` that is True on real completion tokens.
* Losses are to be *minimised*: the PPO surrogate enters with a minus sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protocol.components import OFF_POLICY

__all__ = [
    "ADV_SCALES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "OFF_POLICY",
    "aggregate",
    "equal_reward_groups",
    "expand_group_mask",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
]

ADV_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
# "decoupled" PPO (Hilton et al. 2021, AReaL) with a *truncated* behaviour weight is the same formula as "tis"
# (Yao et al. 2025): clip against the proximal policy, times min(pi_prox / mu, cap); hence one name. (AReaL's
# cap drops tokens above it instead of truncating; not offered.)


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Validate a flat reward vector and view it as ``[groups, group_size]``."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards ({n}) is not a multiple of group_size ({group_size}); "
            "every prompt must contribute exactly group_size completions"
        )
    return rewards.reshape(n // group_size, group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Per-completion advantages from the rewards of its group (GRPO's baseline).

    The group mean replaces a learned critic: ``A_i = r_i - mean(group)``. Then

    * ``"group"`` (GRPO as the papers ran it): divide by the group's *unbiased*
      standard deviation plus ``eps``. Reference eps: 1e-4 in TRL, 1e-6 in
      verl/EasyR1 (our default).
    * ``"batch"``: divide by the unbiased standard deviation of the raw rewards of
      the *whole batch* plus ``eps`` (TRL's ``scale_rewards="batch"``, the
      REINFORCE++-style global normalisation). Keeps the per-prompt baseline but
      does not inflate the gradient of near-unanimous groups the way per-group
      scaling does.
    * ``"none"`` (Dr. GRPO): no scaling; the std division is the question-level
      difficulty bias Dr. GRPO removes.

    ``group_size == 1``: the group mean is the reward itself, so every advantage
    is exactly 0 in every mode (we never divide by the undefined std of one
    sample). Groups whose rewards are all equal likewise get advantage 0 (the
    numerator is 0, and ``eps`` keeps the division finite).

    Integer or boolean rewards are promoted to the default float dtype.
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADV_SCALES}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    grouped = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std(unbiased=True) + eps)
    return centered.reshape(-1)


def equal_reward_groups(rewards: Tensor, group_size: int, atol: float = 1e-6) -> Tensor:
    """``BoolTensor[groups]``: True where all rewards of the group are within ``atol``.

    Such groups have advantage 0 for every completion and so contribute no policy
    gradient (only KL), yet they still dilute a per-sequence mean; dynamic sampling
    (DAPO, verl, OpenRLHF, slime, AReaL) drops them and samples more prompts.
    """
    grouped = _grouped(rewards, group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return spread <= atol


def expand_group_mask(group_mask: Tensor, group_size: int) -> Tensor:
    """Repeat a per-group mask ``[groups]`` to per-sample ``[groups * group_size]``.

    E.g. ``keep = expand_group_mask(~equal_reward_groups(r, G), G)`` selects the
    completions of the groups dynamic sampling keeps.
    """
    if group_mask.dim() != 1:
        raise ValueError(f"group_mask must be 1-D, got shape {tuple(group_mask.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_mask.repeat_interleave(group_size)


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    estimator: str = "k3",
    log_ratio_clamp: float | None = 20.0,
    kl_clamp: float | None = 10.0,
) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    Tokens are sampled from the policy, so with ``d = ref - logp`` (Schulman's
    estimators): ``k1 = -d`` (unbiased, high variance, can be negative),
    ``k2 = d^2 / 2`` (biased, low variance), ``k3 = exp(d) - d - 1`` (unbiased,
    low variance, always >= 0; what GRPO uses, verl's "low_var_kl").

    Safety valves as in verl (None disables either): ``d`` is clamped to
    ``+-log_ratio_clamp`` before ``exp`` in k3 (avoids overflow to inf) and the
    result of every estimator to ``+-kl_clamp``. Clamping zeroes the gradient on
    the tokens where it is active: a token far from the reference stops pulling,
    which is the point (one bad token cannot dominate the step).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    d = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    else:
        if log_ratio_clamp is not None:
            d = d.clamp(-log_ratio_clamp, log_ratio_clamp)
        kl = torch.exp(d) - d - 1.0
    if kl_clamp is not None:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    return kl


def aggregate(
    per_token: Tensor, mask: Tensor, agg: str = "seq-mean-token-mean", max_len: int | None = None
) -> Tensor:
    """Reduce a per-token loss ``[N, T]`` to a scalar over the masked tokens.

    * ``seq-mean-token-mean`` (original GRPO, the papers, TRL "grpo"): mean over
      each sequence's tokens, then mean over the N sequences. A long completion's
      tokens each weigh less, which biases towards long wrong answers.
    * ``token-mean`` (DAPO, TRL "bnpo"/"dapo" on one process): every token weighs
      the same: sum over masked tokens / number of masked tokens.
    * ``seq-mean-token-sum-norm`` (Dr. GRPO, TRL "dr_grpo"): each sequence's token
      *sum* divided by the constant ``max_len`` (default: T), then mean over
      sequences; unbiased in length.

    A sequence with no masked tokens contributes 0 and still counts in the mean
    over sequences (as in TRL); an all-masked batch gives an exact 0 with zero
    gradient, never NaN.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
    norm = per_token.shape[-1] if max_len is None else max_len
    if norm <= 0:
        raise ValueError(f"max_len must be positive, got {norm}")
    return (masked.sum(dim=-1) / norm).mean()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl: str = "k3",
    agg: str = "seq-mean-token-mean",
    entropy: Tensor | None = None,
    max_len: int | None = None,
    log_ratio_clamp: float | None = 20.0,
    kl_clamp: float | None = 10.0,
    off_policy: str = "ppo",
    is_cap: float = 2.0,
    prox_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO surrogate plus optional KL to a reference, aggregated to a scalar.

    Per token, with ``ratio = exp(logp - old_logp)`` and the sequence's advantage A::

        pg = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        if dual_clip and A < 0:  pg = min(pg, -dual_clip * A)   # verl/EasyR1 rule
        loss_token = pg + beta * KL_est(policy || ref)

    then :func:`aggregate` with ``agg``. Asymmetric ``clip_low``/``clip_high`` is
    DAPO's clip-higher. Dual clip bounds the loss of a negative-advantage token
    whose ratio exploded (a stale or off-policy sample), which plain PPO clipping
    leaves unbounded; it must be > 1 or it would cut into the normal range.

    ``old_logprobs``, ``ref_logprobs`` and ``advantages`` are detached: gradients
    flow only into ``logprobs``. With one update per batch (the reference runs)
    pass ``old_logprobs = logprobs.detach()``: the ratio is 1 and only its
    gradient matters. Inputs are upcast to at least float32.

    Positions outside ``mask`` are replaced by 0 before any arithmetic, so padding
    holding -inf/NaN log-probs cannot leak NaN into the loss or the gradient; a
    completion of zero tokens contributes 0.

    ``log_ratio_clamp`` (default 20, like verl; None disables) bounds
    ``logp - old_logp`` (and ``ref - logp`` in k3) before ``exp``; ``kl_clamp``
    (default 10, verl) bounds the per-token KL. Neither triggers in healthy
    training; both zero the gradient where they do.

    Off-policy correction (``old_logprobs`` are always the behaviour policy mu's, i.e. the engine's):

    * ``"ppo"``: the above, ratio and clip against mu.
    * ``"tis"`` (truncated importance sampling, Yao et al. 2025; = decoupled PPO, Hilton et al. 2021 / AReaL,
      with a truncated weight): ratio and clip against the proximal policy ``prox_logprobs`` (default
      ``logprobs.detach()``: the learner's own log-probs at the parameters this optimizer step starts from),
      and the surrogate (dual clip included, KL excluded) times the constant
      ``w = min(exp(prox - old_logp), is_cap)``. With the default proximal the ratio is exactly 1, so the
      clips never bind and the per-token gradient is ``-w * A * grad(logp)``: a truncated-IS policy gradient
      that corrects both staleness and engine/learner numerics. ``w == 1`` when mu is the current policy.

    ``stats`` (python floats, all over masked tokens): ``pg_loss`` (the aggregated
    surrogate without KL), ``clip_frac_low``/``clip_frac_high`` (share of tokens
    where the clipped term was selected: ratio < 1-clip_low with A < 0, resp.
    ratio > 1+clip_high with A > 0), ``clip_frac`` (either), ``dual_clip_frac``
    (share where the dual-clip cap was active; only with ``dual_clip``),
    ``ratio_mean``/``ratio_min``/``ratio_max`` (1.0 when no token is masked in),
    ``kl`` (token-mean of the per-token KL; whenever ``ref_logprobs`` is given, even
    with beta 0), ``entropy`` (token-mean of ``entropy``; when given) and, with ``"tis"``,
    ``is_weight_mean``/``is_weight_max`` (of ``exp(prox - old_logp)`` *before* truncation; 1.0 when no token
    is masked in) and ``is_truncated_frac`` (share of tokens whose weight exceeded ``is_cap``). With
    ``"tis"`` the ratio and clip stats are against the proximal policy.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    others = {
        "old_logprobs": old_logprobs,
        "mask": mask,
        "ref_logprobs": ref_logprobs,
        "entropy": entropy,
        "prox_logprobs": prox_logprobs,
    }
    for name, t in others.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like logprobs")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages must be [N]={shape[0]}, got shape {tuple(advantages.shape)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (verl/EasyR1 use 3.0), got {dual_clip}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's per-token log-probs)")
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl!r}; expected one of {KL_ESTIMATORS}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    if off_policy not in OFF_POLICY:
        raise ValueError(f"unknown off_policy {off_policy!r}; expected one of {OFF_POLICY}")
    if not is_cap > 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    mask = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    def clean(t: Tensor) -> Tensor:
        # where() (not multiply) so that -inf/NaN padding yields exact zeros with zero grad.
        return torch.where(mask, t.to(dtype), zero)

    logp = clean(logprobs)
    old = clean(old_logprobs.detach())
    adv = advantages.detach().to(dtype).unsqueeze(-1)  # [N, 1]
    weight = None
    if off_policy == "tis":
        prox = logp.detach() if prox_logprobs is None else clean(prox_logprobs.detach())
        log_w = prox - old
        if log_ratio_clamp is not None:
            log_w = log_w.clamp(-log_ratio_clamp, log_ratio_clamp)
        raw_w = torch.exp(log_w)
        weight = raw_w.clamp(max=is_cap)
        old = prox  # ratio and clip against the proximal policy from here on

    log_ratio = logp - old
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        cap = -adv * dual_clip
        pg_dual = torch.where(adv < 0, torch.minimum(pg, cap), pg)
        dual_active = (adv < 0) & (pg > cap) & mask
        pg = pg_dual
    if weight is not None:
        pg = weight * pg

    per_token = pg
    kl_tok = None
    if ref_logprobs is not None:
        ref = clean(ref_logprobs.detach())
        kl_tok = kl_penalty(logp, ref, kl, log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
        if beta > 0:
            per_token = pg + beta * kl_tok

    loss = aggregate(per_token, mask, agg, max_len)

    with torch.no_grad():
        m = mask.to(dtype)
        count = m.sum().clamp(min=1.0)
        any_tok = bool(mask.any())

        def frac(b: Tensor) -> Tensor:
            return (b & mask).to(dtype).sum() / count

        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        named = {
            "pg_loss": loss if per_token is pg else aggregate(pg, mask, agg, max_len),
            "clip_frac_low": frac(low),
            "clip_frac_high": frac(high),
            "clip_frac": frac(low | high),
            "ratio_mean": (ratio * m).sum() / count if any_tok else zero + 1.0,
            "ratio_min": ratio[mask].min() if any_tok else zero + 1.0,
            "ratio_max": ratio[mask].max() if any_tok else zero + 1.0,
        }
        if dual_clip is not None:
            named["dual_clip_frac"] = dual_active.to(dtype).sum() / count
        if kl_tok is not None:
            named["kl"] = (kl_tok * m).sum() / count
        if entropy is not None:
            named["entropy"] = (clean(entropy.detach()) * m).sum() / count
        if weight is not None:
            named["is_weight_mean"] = (raw_w * m).sum() / count if any_tok else zero + 1.0
            named["is_weight_max"] = raw_w[mask].max() if any_tok else zero + 1.0
            named["is_truncated_frac"] = frac(raw_w > is_cap)
        # One device->host transfer for all metrics instead of one sync per .item().
        values = torch.stack([v.detach().to(dtype).reshape(()) for v in named.values()]).tolist()
    stats = {k: float(v) for k, v in zip(named, values, strict=True)}
    return loss, stats
