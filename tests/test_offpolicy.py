"""Off-policy correction in learner.grpo.policy_loss (``off_policy="tis"``) and its GRPOConfig fields.

References are written out independently of ``policy_loss``: the explicit truncated-IS formula
(``-min(pi_prox/mu, C) * min(r A, clip(r) A) + beta * k3``, r = pi / pi_prox) and, for the default proximal
policy (r == 1), the REINFORCE form ``-w * A * logp`` whose gradient must be the same.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import AGGREGATIONS, OFF_POLICY, policy_loss
from protocol.components import GRPOConfig

D = torch.float64
TMAX = 7  # max_len for seq-mean-token-sum-norm


def close(a, b, tol=1e-10):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


def batch(seed: int, n: int = 5, T: int = 6, stale: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, T, generator=g, dtype=D) * 3.0
    mu = logp + stale * torch.randn(n, T, generator=g, dtype=D)  # behaviour: weights spread past the cap
    ref = logp + 0.3 * torch.randn(n, T, generator=g, dtype=D)
    adv = torch.randn(n, generator=g, dtype=D)
    adv[0], adv[1] = -abs(adv[0]), abs(adv[1])
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    lengths[-1] = 0  # a completion of zero tokens
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return logp, mu, ref, adv, mask


def agg_hand(per, mask, agg):
    m = mask.to(per.dtype)
    if agg == "token-mean":
        return (per * m).sum() / m.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return ((per * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    return ((per * m).sum(-1) / TMAX).mean()


def reference(logp, mu, adv, mask, agg, beta=0.0, ref=None, cap=2.0, prox=None, clip=(0.2, 0.2), dual=None):
    """The explicit formula; ``logp`` is a leaf, everything else constant."""
    z = torch.zeros((), dtype=D)
    lp, mu = torch.where(mask, logp, z), torch.where(mask, mu, z)
    prox = lp.detach() if prox is None else torch.where(mask, prox, z)
    w = torch.exp(prox - mu).clamp(max=cap)
    r, a = torch.exp(lp - prox), adv.unsqueeze(-1)
    surr = torch.minimum(r * a, r.clamp(1 - clip[0], 1 + clip[1]) * a)
    if dual is not None:
        surr = torch.where(a < 0, torch.maximum(surr, dual * a), surr)
    per = -w * surr
    if beta:
        d = torch.where(mask, ref, z) - lp
        per = per + beta * (torch.exp(d) - d - 1)
    return agg_hand(per, mask, agg)


def run(logp, mu, adv, mask, **kw):
    leaf = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(leaf, mu, adv, mask, max_len=TMAX, **kw)
    loss.backward()
    return loss.detach(), leaf.grad, stats


def run_ref(logp, *args, **kw):
    leaf = logp.clone().requires_grad_(True)
    loss = reference(leaf, *args, **kw)
    loss.backward()
    return loss.detach(), leaf.grad


def test_modes_are_ppo_and_tis_only():
    assert OFF_POLICY == ("ppo", "tis")


def test_tiny_hand_example():
    # raw weights pi/mu = [1.5, 0.5, 8]; cap 2 -> [1.5, 0.5, 2]; A = 1, one sequence of 3 tokens.
    p = torch.tensor([[0.6, 0.25, 0.8]], dtype=D)
    q = torch.tensor([[0.4, 0.5, 0.1]], dtype=D)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, grad, stats = run(p.log(), q.log(), torch.ones(1, dtype=D), mask, off_policy="tis", is_cap=2.0)
    close(loss, -4.0 / 3.0)  # -(1.5 + 0.5 + 2) / 3 at ratio 1
    close(grad, [[-0.5, -1.0 / 6.0, -2.0 / 3.0]])  # -w * A / 3
    close(stats["is_weight_mean"], 10.0 / 3.0)  # before truncation
    close(stats["is_weight_max"], 8.0)
    close(stats["is_truncated_frac"], 1.0 / 3.0)
    close(stats["pg_loss"], -4.0 / 3.0)
    assert stats["clip_frac"] == 0.0 and stats["ratio_min"] == stats["ratio_max"] == 1.0
    # "ppo" on the same data: ratio pi/mu; ratios 1.5 and 8 exceed 1.2 with A > 0, so only token 2 pulls.
    loss, grad, stats = run(p.log(), q.log(), torch.ones(1, dtype=D), mask)
    close(grad, [[0.0, -0.5 / 3.0, 0.0]])  # d(ratio)/d(logp) = ratio = 0.5
    assert not any(k.startswith("is_") for k in stats)


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_on_policy_tis_equals_ppo(agg, beta, dual, seed):
    logp, _, ref, adv, mask = batch(seed)
    kw = dict(ref_logprobs=ref if beta else None, beta=beta, agg=agg, dual_clip=dual)
    ppo = run(logp, logp, adv, mask, **kw)
    tis = run(logp, logp, adv, mask, off_policy="tis", is_cap=1.0 + seed, **kw)  # w = 1 exactly: not truncated
    close(tis[0], ppo[0])
    close(tis[1], ppo[1])
    assert ppo[1].abs().max() > 0
    assert tis[2]["is_weight_mean"] == tis[2]["is_weight_max"] == 1.0
    assert tis[2]["is_truncated_frac"] == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stale_tis_matches_reference(agg, beta, seed):
    logp, mu, ref, adv, mask = batch(seed)
    kw = dict(ref_logprobs=ref if beta else None, beta=beta, agg=agg)
    loss, grad, stats = run(logp, mu, adv, mask, off_policy="tis", is_cap=2.0, **kw)
    ref_loss, ref_grad = run_ref(logp, mu, adv, mask, agg, beta=beta, ref=ref, cap=2.0)
    close(loss, ref_loss)
    close(grad, ref_grad)
    # REINFORCE form: at r == 1 the gradient is that of -w * A * logp (+ KL).
    w = torch.exp(logp - mu).clamp(max=2.0)
    leaf = logp.clone().requires_grad_(True)
    d = ref - leaf
    per = -w * adv.unsqueeze(-1) * leaf + (beta * (torch.exp(d) - d - 1) if beta else 0.0)
    agg_hand(per, mask, agg).backward()
    close(grad, leaf.grad)
    # The data really is stale: some weights truncated, and "ppo" gives another gradient.
    assert 0 < stats["is_truncated_frac"] < 1 and stats["is_weight_max"] > 2.0
    assert (run(logp, mu, adv, mask, **kw)[1] - grad).abs().max() > 1e-3


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_explicit_proximal_clips_against_proximal(agg):
    logp, mu, ref, adv, mask = batch(3)
    prox = logp + 0.4 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(9), dtype=D)
    prox[0, :2] = logp[0, :2] - 1.5  # r = e^1.5 > dual clip 3 with A < 0
    kw = dict(ref_logprobs=ref, beta=0.04, agg=agg, dual_clip=3.0, clip_low=0.2, clip_high=0.28)
    loss, grad, stats = run(logp, mu, adv, mask, off_policy="tis", is_cap=1.5, prox_logprobs=prox, **kw)
    ref_loss, ref_grad = run_ref(logp, mu, adv, mask, agg, beta=0.04, ref=ref, cap=1.5, prox=prox,
                                 clip=(0.2, 0.28), dual=3.0)
    close(loss, ref_loss)
    close(grad, ref_grad)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0 and stats["dual_clip_frac"] > 0
    w = torch.exp(prox - mu)[mask]
    close(stats["is_weight_max"], w.max())
    close(stats["is_weight_mean"], w.mean())
    close(stats["is_truncated_frac"], (w > 1.5).to(D).mean())


def test_truncation_caps_weights():
    # One sequence, A = 1, token-mean: each token's gradient is -min(w, cap) / T exactly.
    raw = torch.tensor([[0.1, 0.9, 1.0, 2.5, 40.0, 1e6]], dtype=D)
    logp = torch.full_like(raw, -1.0)
    mask = torch.ones_like(raw, dtype=torch.bool)
    for cap in (0.5, 1.0, 3.0, 100.0):
        loss, grad, stats = run(logp, logp - raw.log(), torch.ones(1, dtype=D), mask, off_policy="tis",
                                is_cap=cap, agg="token-mean")
        close(grad, -raw.clamp(max=cap) / 6, tol=1e-9)
        assert grad.min() >= -cap / 6 - 1e-12
        close(stats["is_truncated_frac"], (raw > cap).to(D).mean())
        close(stats["is_weight_max"], 1e6, tol=1e-3)
        close(stats["is_weight_mean"], raw.mean(), tol=1e-6)


def test_kl_is_not_importance_weighted():
    logp, mu, ref, _, mask = batch(4, stale=2.0)
    adv = torch.zeros(logp.shape[0], dtype=D)  # no policy gradient: only the KL term is left
    tis = run(logp, mu, adv, mask, off_policy="tis", ref_logprobs=ref, beta=0.1)
    ppo = run(logp, mu, adv, mask, ref_logprobs=ref, beta=0.1)
    close(tis[0], ppo[0])
    close(tis[1], ppo[1])
    assert tis[1].abs().max() > 0 and tis[2]["is_truncated_frac"] > 0


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_masks_and_garbage_padding(agg):
    logp, mu, ref, adv, mask = batch(5)
    clean = run(logp, mu, adv, mask, off_policy="tis", agg=agg, ref_logprobs=ref, beta=0.04)
    dirty = [t.clone() for t in (logp, mu, ref)]
    for t, bad in zip(dirty, (float("-inf"), float("nan"), float("inf")), strict=True):
        t[~mask] = bad
    dirty_mu_huge = mu.clone()
    dirty_mu_huge[~mask] = -1e4  # a would-be weight of e^20 on padding must not show in the stats
    for lp, m_, rf in ((dirty[0], dirty[1], dirty[2]), (logp, dirty_mu_huge, ref)):
        got = run(lp, m_, adv, mask, off_policy="tis", agg=agg, ref_logprobs=rf, beta=0.04)
        close(got[0], clean[0])
        close(got[1], clean[1])
        assert (got[1][~mask] == 0).all()
        assert got[2] == pytest.approx(clean[2], abs=1e-12)
    # All-masked batch: exact 0, zero gradient, neutral weight stats.
    none = torch.zeros_like(mask)
    loss, grad, stats = run(logp, mu, adv, none, off_policy="tis", agg=agg)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert stats["is_weight_mean"] == stats["is_weight_max"] == 1.0 and stats["is_truncated_frac"] == 0.0


def test_bfloat16_inputs():
    logp, mu, _, adv, mask = batch(6)
    leaf = logp.to(torch.bfloat16).requires_grad_(True)
    loss, stats = policy_loss(leaf, mu.to(torch.bfloat16), adv, mask, off_policy="tis")
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(leaf.grad.float()).all() and stats["is_weight_max"] > 1


def test_errors():
    logp, mu, _, adv, mask = batch(0)
    with pytest.raises(ValueError, match="off_policy"):
        policy_loss(logp, mu, adv, mask, off_policy="decoupled")
    for cap in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="is_cap"):
            policy_loss(logp, mu, adv, mask, off_policy="tis", is_cap=cap)
    with pytest.raises(ValueError, match="prox_logprobs"):
        policy_loss(logp, mu, adv, mask, off_policy="tis", prox_logprobs=logp[:, :2])


def test_config_fields_and_validation():
    cfg = GRPOConfig()
    assert (cfg.off_policy, cfg.is_cap) == ("ppo", 2.0)
    assert GRPOConfig(off_policy="tis", is_cap=5).is_cap == 5
    with pytest.raises(ValueError, match=r"algorithm\.off_policy.*'tis'"):
        GRPOConfig(off_policy="decoupled")
    with pytest.raises(ValueError, match=r"algorithm\.off_policy"):
        GRPOConfig(off_policy="TIS")
    for cap in (0, -2.0, math.nan, "2", None, True):
        with pytest.raises(ValueError, match=r"algorithm\.is_cap"):
            GRPOConfig(is_cap=cap)


@pytest.fixture(scope="module")
def tiny_stale_batch(tiny_policy, shapes_dataset):
    """Real completions of the tiny model on three shapes prompts, with behaviour log-probs made stale."""
    from learner.objective import pad_rows
    from protocol.components import SamplingConfig
    from tasks.examples import build_examples
    from vlm.generation import sample_completions
    from vlm.inputs import build_sequence_batch, vision_token_ids

    model, processor = tiny_policy
    examples, _ = build_examples(processor, shapes_dataset, shapes_dataset.split("train")[:3], "cls_rl", 56 * 56,
                                 112 * 112, seed=0)
    prompts = [e.inputs for e in examples]
    groups = sample_completions(model, processor.tokenizer, prompts, SamplingConfig(n=2, max_new_tokens=8), seed=1, image_processor=processor.image_processor)
    comps = [c for g in groups for c in g]
    batch = build_sequence_batch([p for p, g in zip(prompts, groups) for _ in g], [c.token_ids for c in comps],
                                 model.generation_config.pad_token_id, model.config.image_token_id,
                                 processor.image_processor)
    gen = torch.Generator().manual_seed(7)
    behaviour = pad_rows([c.logprobs for c in comps])
    mu = behaviour + 0.8 * torch.randn(behaviour.shape, generator=gen)  # weights spread past the cap
    ref = behaviour + 0.3 * torch.randn(behaviour.shape, generator=gen)
    adv = torch.randn(len(comps), generator=gen)
    return model, batch, mu, ref, adv, vision_token_ids(model.config)


def test_grpo_objective_passes_the_mode(tiny_stale_batch):
    """grpo_objective on the tiny model's real forward: each mode's loss is policy_loss in that mode on the
    model's own log-probs and entropy, and the two modes differ on stale data."""
    from learner.objective import grpo_objective
    from vlm.logprobs import completion_logprobs

    model, batch, mu, ref, adv, blocked = tiny_stale_batch
    losses = {}
    with torch.no_grad():
        for mode in OFF_POLICY:
            cfg = GRPOConfig(off_policy=mode, is_cap=1.7, beta=0.04, loss_agg="token-mean")
            loss, stats = grpo_objective(model, batch, mu, adv, cfg, blocked, ref_logprobs=ref)
            logp, mask, entropy = completion_logprobs(model, batch, cfg.temperature, blocked, with_entropy=True)
            want, want_stats = policy_loss(logp, mu, adv, mask, ref_logprobs=ref, beta=0.04, agg="token-mean",
                                           entropy=entropy, off_policy=mode, is_cap=1.7)
            assert mask.sum() > 0
            torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
            assert ("is_truncated_frac" in stats) == (mode == "tis")
            assert stats["logprob_gap"] == pytest.approx(float((logp - mu).abs()[mask].mean()), abs=1e-5)
            for k, v in want_stats.items():
                assert stats[k] == pytest.approx(v, abs=1e-6), k
            losses[mode] = loss.item()
    assert stats["is_truncated_frac"] > 0  # the batch is stale enough for truncation to act
    assert abs(losses["tis"] - losses["ppo"]) > 1e-4


@pytest.mark.parametrize("explicit_prox", [False, True], ids=["prox=current", "prox=given"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_tis_matches_trl_token_truncate(loss_type, beta, explicit_prox):
    """TRL's vLLM IS correction, mode token_truncate: per-token loss vs old (= proximal) times
    clamp(exp(old - sampling), max=C), KL added unweighted."""
    from tests.test_grpo_trl import MAX_COMPLETION_LENGTH, PAIRS, _random_batch, _trl_trainer

    logp, mu, ref, adv, mask, entropy = _random_batch(11)
    prox = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=D)
    old = prox if explicit_prox else logp
    trainer = _trl_trainer(loss_type, beta, 0.2, 0.28, None)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    leaf = logp.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, entropy, None)
    fmask = mask.to(D)
    n, T = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": fmask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": fmask.sum(),
        "importance_sampling_ratio": torch.exp((old - mu) * fmask).clamp(max=2.0),  # TRL's token_truncate
    }
    trl_loss = trainer._compute_loss(None, inputs)
    trl_loss.backward()

    ours = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(ours, mu, adv, mask, ref_logprobs=ref if beta else None, beta=beta,
                              clip_low=0.2, clip_high=0.28, agg=PAIRS[loss_type], max_len=MAX_COMPLETION_LENGTH,
                              off_policy="tis", is_cap=2.0, prox_logprobs=prox if explicit_prox else None,
                              log_ratio_clamp=None, kl_clamp=None)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-9
    torch.testing.assert_close(ours.grad, leaf.grad, rtol=0, atol=1e-9)
    assert stats["is_truncated_frac"] > 0
