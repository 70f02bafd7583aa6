"""learner.grpo: hand-computed cases, error paths and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import (
    aggregate,
    equal_reward_groups,
    expand_group_mask,
    group_advantages,
    kl_penalty,
    policy_loss,
    token_entropy,
)

D = torch.float64
LOG2 = math.log(2.0)


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=0, atol=tol)


# ---------------------------------------------------------------- advantages

REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_group_advantages_group_scale_hand():
    # group 1: mean .25, centred [.75,-.25,-.25,-.25], unbiased std sqrt(.75/3) = .5
    # group 2: mean .5, centred [.5,.5,-.5,-.5], unbiased std sqrt(1/3)
    a = group_advantages(t(REWARDS), 4, "group", eps=0.0)
    s3 = math.sqrt(3.0) / 2.0  # .5 / sqrt(1/3)
    close(a, [1.5, -0.5, -0.5, -0.5, s3, s3, -s3, -s3])
    a = group_advantages(t(REWARDS), 4, "group", eps=1e-4)
    close(a[0], 0.75 / (0.5 + 1e-4))


def test_group_advantages_batch_scale_hand():
    # whole batch: 3 ones, 5 zeros, mean 3/8; unbiased var = (3*(5/8)^2 + 5*(3/8)^2)/7 = 120/448
    std = math.sqrt(120.0 / 448.0)
    a = group_advantages(t(REWARDS), 4, "batch", eps=1e-6)
    centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    close(a, [c / (std + 1e-6) for c in centred])


def test_group_advantages_none_scale_hand():
    close(group_advantages(t(REWARDS), 4, "none"), [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])


def test_group_advantages_equal_group_and_group_size_one():
    a = group_advantages(t([2.0, 2.0, 2.0, 0.0, 1.0, 2.0]), 3, "group")
    close(a[:3], [0.0, 0.0, 0.0])
    close(a[3:], [-1.0 / (1 + 1e-6), 0.0, 1.0 / (1 + 1e-6)])
    for scale in ("group", "batch", "none"):
        a = group_advantages(t([3.0, -1.0, 7.0]), 1, scale)
        assert torch.equal(a, torch.zeros(3, dtype=D)), scale


def test_group_advantages_int_rewards_and_errors():
    a = group_advantages(torch.tensor([1, 0]), 2, "none")
    assert a.is_floating_point()
    close(a, [0.5, -0.5])
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.zeros(8), 4, "token")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="positive int"):
        group_advantages(torch.zeros(4), 0)


def test_equal_reward_groups_and_expand():
    r = t([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    eq = equal_reward_groups(r, 3)
    assert eq.dtype == torch.bool and eq.tolist() == [True, False]
    assert equal_reward_groups(t([1.0, 1.0 + 1e-9]), 2).tolist() == [True]
    assert equal_reward_groups(t([1.0, 1.0 + 1e-9]), 2, atol=0.0).tolist() == [False]
    keep = expand_group_mask(~eq, 3)
    assert keep.tolist() == [False, False, False, True, True, True]
    with pytest.raises(ValueError):
        equal_reward_groups(torch.zeros(5), 2)


# ---------------------------------------------------------------- KL, aggregation, entropy


def test_kl_estimators_hand():
    half, quarter = t([math.log(0.5)]), t([math.log(0.25)])
    # logp = log .5, ref = log .25: d = ref - logp = -log 2
    close(kl_penalty(half, quarter, "k1"), [LOG2])
    close(kl_penalty(half, quarter, "k2"), [0.5 * LOG2**2])
    close(kl_penalty(half, quarter, "k3"), [0.5 + LOG2 - 1.0])
    # logp = log .25, ref = log .5: d = +log 2
    close(kl_penalty(quarter, half, "k1"), [-LOG2])
    close(kl_penalty(quarter, half, "k3"), [2.0 - LOG2 - 1.0])
    # verl-style clamps: k3 of d = 5 is e^5 - 6 = 142.4, clamped to 10 unless disabled
    close(kl_penalty(t([0.0]), t([5.0]), "k3"), [10.0])
    close(kl_penalty(t([0.0]), t([5.0]), "k3", kl_clamp=None), [math.exp(5.0) - 6.0])
    close(kl_penalty(t([0.0]), t([30.0]), "k3", kl_clamp=None), [math.exp(20.0) - 21.0], tol=1e-3)
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(half, quarter, "k4")


PER_TOKEN = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, -100.0]]
MASK = [[True, True, True, True], [True, True, False, False]]


@pytest.mark.parametrize(
    "agg,max_len,expected",
    [
        ("seq-mean-token-mean", None, (10 / 4 + 11 / 2) / 2),  # 4.0
        ("token-mean", None, 21 / 6),
        ("seq-mean-token-sum-norm", None, (10 / 4 + 11 / 4) / 2),  # max_len defaults to T = 4
        ("seq-mean-token-sum-norm", 10, (10 / 10 + 11 / 10) / 2),
    ],
)
def test_aggregations_hand(agg, max_len, expected):
    close(aggregate(t(PER_TOKEN), torch.tensor(MASK), agg, max_len), expected)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(t(PER_TOKEN), torch.tensor(MASK), "seq-sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(t(PER_TOKEN), torch.tensor(MASK), "seq-mean-token-sum-norm", 0)


def test_token_entropy():
    close(token_entropy(torch.zeros(2, 3, 5, dtype=D)), torch.full((2, 3), math.log(5.0), dtype=D))
    peaked = t([[0.0, float("-inf"), float("-inf")], [0.0, 0.0, float("-inf")]])
    close(token_entropy(peaked), [0.0, LOG2])
    assert token_entropy(torch.zeros(4, 7, dtype=torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------- policy loss


def _one_token_case(ratios, advs):
    """[N, 1] inputs with old_logprobs 0, so that ratio = exp(logp) = the given ratio."""
    logp = t([[math.log(r)] for r in ratios]).requires_grad_(True)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp, dtype=torch.bool)
    return logp, old, t(advs), mask


def test_clip_hand_values_fractions_and_grads():
    logp, old, adv, mask = _one_token_case([1.5, 0.5, 0.5, 1.5], [1.0, -1.0, 1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, mask)
    # high-clipped -1.2, low-clipped +0.8, unclipped -0.5 and +1.5; mean over 4 sequences
    close(loss, (-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert stats["clip_frac_low"] == pytest.approx(0.25)
    assert stats["clip_frac_high"] == pytest.approx(0.25)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    assert stats["pg_loss"] == pytest.approx(0.15)
    assert "kl" not in stats and "entropy" not in stats and "dual_clip_frac" not in stats
    loss.backward()
    # clipped tokens get no gradient; unclipped: d(-A * ratio)/dlogp / N = -A * ratio / 4
    close(logp.grad.squeeze(1), [0.0, 0.0, -0.5 / 4, 1.5 / 4])


def test_clip_higher_asymmetric():
    logp, old, adv, mask = _one_token_case([1.5, 0.5], [1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.28)
    close(loss, (-1.28 + 0.9) / 2)
    assert stats["clip_frac"] == pytest.approx(1.0)


def test_dual_clip_hand():
    logp, old, adv, mask = _one_token_case([5.0, 2.0, 5.0, 4.0], [-1.0, -1.0, 1.0, -2.0])
    loss, stats = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # A<0 ratio 5: unclipped 5 capped at 3; ratio 2: 2 (cap 3 inactive); A>0 ratio 5: -1.2; A=-2 ratio 4: 8 -> 6
    close(loss, (3.0 + 2.0 - 1.2 + 6.0) / 4)
    assert stats["dual_clip_frac"] == pytest.approx(0.5)
    assert stats["clip_frac_high"] == pytest.approx(0.25)
    loss.backward()
    close(logp.grad.squeeze(1), [0.0, 2.0 / 4, 0.0, 0.0])
    # without dual clip the same batch is unbounded in the ratio
    loss_plain, _ = policy_loss(logp.detach(), old, adv, mask)
    close(loss_plain, (5.0 + 2.0 - 1.2 + 8.0) / 4)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            policy_loss(logp, old, adv, mask, dual_clip=bad)


def test_kl_term_and_stats():
    logp = t([[math.log(0.5), math.log(0.5)]]).requires_grad_(True)
    ref = t([[math.log(0.25), math.log(0.25)]])
    mask = torch.tensor([[True, True]])
    zero_adv = t([0.0])
    k3 = 0.5 + LOG2 - 1.0
    loss, stats = policy_loss(logp, logp.detach(), zero_adv, mask, ref_logprobs=ref, beta=0.1)
    close(loss, 0.1 * k3)
    assert stats["kl"] == pytest.approx(k3) and stats["pg_loss"] == pytest.approx(0.0)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 0.5 per token; beta .1; mean over 2 tokens
    close(logp.grad, [[0.1 * 0.5 / 2, 0.1 * 0.5 / 2]])
    loss, stats = policy_loss(logp, logp.detach(), zero_adv, mask, ref_logprobs=ref, beta=0.1, kl="k2")
    close(loss, 0.1 * 0.5 * LOG2**2)
    # ref given with beta 0: reported, not added
    loss, stats = policy_loss(logp, logp.detach(), zero_adv, mask, ref_logprobs=ref, beta=0.0, kl="k1")
    close(loss, 0.0)
    assert stats["kl"] == pytest.approx(LOG2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, logp.detach(), zero_adv, mask, beta=0.04)


def test_fully_masked_row_and_garbage_padding():
    logp = t([[-1.0, -2.0, float("-inf")], [float("nan"), float("-inf"), float("inf")]]).requires_grad_(True)
    old = t([[-1.5, -2.0, float("nan")], [float("-inf"), 0.0, float("nan")]])
    ref = t([[-1.0, -1.0, float("nan")], [float("nan"), float("nan"), float("nan")]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    adv = t([1.0, -1.0])
    ent = t([[0.5, 1.5, float("nan")], [float("nan")] * 3])
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        logp.grad = None
        loss, stats = policy_loss(
            logp, old, adv, mask, ref_logprobs=ref, beta=0.04, agg=agg, entropy=ent, dual_clip=3.0
        )
        assert torch.isfinite(loss), agg
        assert all(math.isfinite(v) for v in stats.values()), (agg, stats)
        loss.backward()
        assert torch.isfinite(logp.grad).all(), agg
        assert torch.equal(logp.grad[1], torch.zeros(3, dtype=D)) and logp.grad[0, 2] == 0
    assert stats["entropy"] == pytest.approx(1.0)
    # row 0 (seq-mean-token-mean): ratio e^.5 > 1.2 and A > 0 -> -1.2 on token 0; token 1 ratio 1 -> -1;
    # row 1 is empty and counts as 0 in the mean over 2 sequences (TRL's convention)
    k3 = math.exp(1.0) - 1.0 - 1.0  # token 1: d = ref - logp = 1
    loss, _ = policy_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.04)
    close(loss, ((-1.2 - 1.0 + 0.04 * k3) / 2) / 2)


def test_all_masked_batch_is_zero_not_nan():
    logp = torch.full((2, 3), float("nan"), dtype=D, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = policy_loss(logp, logp.detach(), t([1.0, -1.0]), mask, ref_logprobs=logp.detach(), beta=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3, dtype=D))
    assert stats["ratio_min"] == 1.0 and stats["clip_frac"] == 0.0 and stats["kl"] == 0.0


def test_policy_loss_shape_and_argument_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), m)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(x, x, torch.zeros(2), m, agg="sum")
    with pytest.raises(ValueError, match="KL estimator"):
        policy_loss(x, x, torch.zeros(2), m, kl="k9")


def test_log_ratio_clamp():
    logp = t([[30.0]]).requires_grad_(True)
    loss, stats = policy_loss(logp, t([[0.0]]), t([-1.0]), torch.tensor([[True]]))
    close(loss, math.exp(20.0), tol=1e-3)
    assert stats["ratio_max"] == pytest.approx(math.exp(20.0))
    loss.backward()
    assert logp.grad.item() == 0.0
    loss, _ = policy_loss(logp, t([[0.0]]), t([-1.0]), torch.tensor([[True]]), log_ratio_clamp=None)
    close(loss, math.exp(30.0), tol=1e3)


def test_bfloat16_inputs_are_upcast():
    logp = torch.full((2, 2), -1.0, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- properties

rewards_st = st.integers(1, 5).flatmap(
    lambda g: st.tuples(
        st.just(g),
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=g, max_size=6 * g).map(
            lambda xs, g=g: xs[: len(xs) - len(xs) % g]
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(rewards_st, st.sampled_from(["group", "batch", "none"]))
def test_prop_group_advantages_sum_to_zero_and_shift_invariant(case, scale):
    g, xs = case
    r = t(xs)
    a = group_advantages(r, g, scale)
    assert a.shape == r.shape and torch.isfinite(a).all()
    sums = a.reshape(-1, g).sum(dim=1)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-6)
    close(group_advantages(r + 3.25, g, scale), a, tol=1e-6)


@settings(max_examples=40, deadline=None)
@given(rewards_st)
def test_prop_group_scale_unit_std(case):
    g, xs = case
    r = t(xs)
    a = group_advantages(r, g, "group", eps=0.0).reshape(-1, g)
    if g < 2:
        return
    spread = r.reshape(-1, g).std(dim=1)
    for row, s in zip(a, spread, strict=True):
        if s > 1e-3:
            assert row.std().item() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 8),
    st.sampled_from(["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]),
    st.integers(0, 2**31 - 1),
)
def test_prop_on_policy_gradient_is_minus_advantage_over_length(n, T, agg, seed):
    """Ratio 1, beta 0: d loss / d logp[i, t] = -A_i * w_i on masked tokens, 0 elsewhere, with
    w_i = 1/(len_i N) (seq-mean-token-mean), 1/total tokens (token-mean), 1/(max_len N) (Dr. GRPO)."""
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, T, generator=gen, dtype=D) * 5).requires_grad_(True)
    adv = torch.randn(n, generator=gen, dtype=D)
    lengths = torch.randint(0, T + 1, (n,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, agg=agg, max_len=T + 3)
    loss.backward()
    if agg == "seq-mean-token-mean":
        w = 1.0 / (lengths.clamp(min=1).to(D) * n)
    elif agg == "token-mean":
        w = torch.full((n,), 1.0 / max(int(lengths.sum()), 1), dtype=D)
    else:
        w = torch.full((n,), 1.0 / ((T + 3) * n), dtype=D)
    expected = (-adv * w).unsqueeze(1) * mask
    close(logp.grad, expected, tol=1e-12)
    # the value: -sum_i A_i * len_i * w_i; no clipping on-policy
    close(loss, -(adv * lengths.to(D) * w).sum(), tol=1e-12)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
