"""Agreement of learner.grpo with TRL's own GRPOTrainer code, on random float64 inputs.

The loss side drives TRL's real ``GRPOTrainer._compute_loss``: an instance made with
``object.__new__`` (no model, no accelerator setup) carries only the attributes that
method reads, and its ``_get_per_token_logps_and_entropies`` is replaced on the instance
so that it returns our leaf tensor. Values, gradients w.r.t. the log-probs and TRL's
logged metrics (clip ratios, KL, entropy) are compared with ours.

Pairings (TRL ``loss_type`` -> our ``agg``), each with beta 0 and beta 0.04 (k3), with
and without dual clip:

* ``grpo``    -> ``seq-mean-token-mean``
* ``bnpo``    -> ``token-mean``
* ``dapo``    -> ``token-mean`` (TRL divides by ``num_items_in_batch / num_processes``,
  which on one process and one accumulation step is the batch's token count)
* ``dr_grpo`` -> ``seq-mean-token-sum-norm`` with ``max_len = max_completion_length``
* our ``dual_clip=c`` -> TRL's ``delta=c`` (two-sided clipping caps the unclipped ratio
  at delta; for A < 0 that is exactly the verl cap -c*A, for A > 0 the clipped term
  already wins, so values and gradients coincide).

Skipped, no counterpart here: TRL ``cispo``, ``sapo``, ``vespo``, ``luspo``, sequence-level
importance sampling (GSPO), ``top_entropy_quantile``, the off-policy mask, vLLM importance
correction, entropy bonus. Skipped, no counterpart in TRL: our k1/k2 estimators and the
verl clamps (disabled here with ``log_ratio_clamp=None, kl_clamp=None``).

Advantages: TRL computes them inline in the long ``_generate_and_score_completions``, not in
a callable function. We (a) check our formula against TRL's own ``nanstd`` and TRL's eps
1e-4, and (b) extract TRL's ``sum_then_normalize`` block from the method's source and
execute it on our rewards; (b) skips with a reason if a TRL release reshapes that block.
"""

from __future__ import annotations

import inspect
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.grpo_trainer as grpo_trainer  # a dev dependency (pinned in pyproject.toml): fail, not skip
from trl.trainer.utils import nanstd

from learner import group_advantages, policy_loss

GRPOTrainer = grpo_trainer.GRPOTrainer
D = torch.float64
TOL = 1e-6
PAIRS = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
MAX_COMPLETION_LENGTH = 16


class _OneProcessAccelerator:
    """What _compute_loss asks of accelerate's Accelerator, for a single process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_trainer(loss_type: str, beta: float, eps_low: float, eps_high: float, delta: float | None):
    trainer = object.__new__(GRPOTrainer)
    trainer.loss_type = loss_type
    trainer.beta = beta
    trainer.epsilon_low = eps_low
    trainer.epsilon_high = eps_high
    trainer.importance_sampling_level = "token"
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.aux_loss_enabled = False
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer._entropy_bonus_enabled = False
    trainer.max_completion_length = MAX_COMPLETION_LENGTH
    trainer.current_gradient_accumulation_steps = 1
    trainer.args = SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1)
    trainer.model = torch.nn.Linear(1, 1)  # only .training is read
    trainer.accelerator = _OneProcessAccelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def _random_batch(seed: int, n: int = 6, T: int = 12):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, T, generator=gen, dtype=D) * 4.0
    old = logp + 0.35 * torch.randn(n, T, generator=gen, dtype=D)  # ratios spread past both clip edges
    old[0, :3] = logp[0, :3] + 2.0  # ratio e^-2: beyond the low clip
    old[1, :3] = logp[1, :3] - 1.5  # ratio e^1.5 = 4.5 > dual clip 3
    ref = logp + 0.5 * torch.randn(n, T, generator=gen, dtype=D)
    adv = torch.randn(n, generator=gen, dtype=D)
    adv[0], adv[1] = -abs(adv[0]), -abs(adv[1])
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    lengths[-1] = 0  # a completion of zero tokens
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    entropy = torch.rand(n, T, generator=gen, dtype=D) * 3.0
    return logp, old, ref, adv, mask, entropy


def _trl_loss(loss_type, beta, delta, logp, old, ref, adv, mask, entropy, eps_low, eps_high):
    trainer = _trl_trainer(loss_type, beta, eps_low, eps_high, delta)
    leaf = logp.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (leaf, entropy, None)
    n, T = logp.shape
    fmask = mask.to(D)
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, T, dtype=torch.long),
        "completion_mask": fmask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": fmask.sum(),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), leaf.grad, trainer._metrics["train"]


@pytest.mark.parametrize("delta", [None, 3.0], ids=["plain", "dual_clip"])
@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["beta0", "beta0.04"])
@pytest.mark.parametrize("loss_type", sorted(PAIRS))
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_trl(loss_type, beta, delta, seed):
    eps_low, eps_high = 0.2, 0.28
    logp, old, ref, adv, mask, entropy = _random_batch(seed)
    trl_loss, trl_grad, metrics = _trl_loss(
        loss_type, beta, delta, logp, old, ref, adv, mask, entropy, eps_low, eps_high
    )

    leaf = logp.clone().requires_grad_(True)
    ours, stats = policy_loss(
        leaf, old, adv, mask, ref_logprobs=ref if beta > 0 else None, beta=beta,
        clip_low=eps_low, clip_high=eps_high, dual_clip=delta, kl="k3", agg=PAIRS[loss_type],
        entropy=entropy, max_len=MAX_COMPLETION_LENGTH, log_ratio_clamp=None, kl_clamp=None,
    )  # fmt: skip
    ours.backward()

    assert ours.dtype == D
    assert abs(ours.item() - trl_loss.item()) < TOL, (ours.item(), trl_loss.item())
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().max() > 0
    torch.testing.assert_close(leaf.grad, trl_grad, rtol=0, atol=TOL)
    # The batch really exercises the clip paths (else this comparison would prove little).
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
    assert (stats.get("dual_clip_frac", 1.0)) > 0
    # TRL's logged metrics, same definitions (masked token means).
    assert stats["clip_frac_low"] == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=TOL)
    assert stats["clip_frac_high"] == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=TOL)
    assert stats["clip_frac"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=TOL)
    assert stats["entropy"] == pytest.approx(metrics["entropy"][0], abs=TOL)
    if beta > 0:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], abs=TOL)


def _rewards(seed: int, groups: int = 5, g: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (groups * g,), generator=gen).to(D) * 0.5
    r[:g] = 1.0  # one group with identical rewards
    return r


def _trl_advantage_block() -> str | None:
    """The body of TRL's ``if self.multi_objective_aggregation == "sum_then_normalize":`` branch."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next((i for i, s in enumerate(lines) if 'multi_objective_aggregation == "sum_then_normalize"' in s), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for s in lines[start + 1 :]:
        if s.strip() and len(s) - len(s.lstrip()) <= indent:
            break
        body.append(s)
    return textwrap.dedent("\n".join(body))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [2, 4])
def test_advantages_match_trl_source_block(scale, g):
    block = _trl_advantage_block()
    assert block is not None and "advantages" in block, "the pinned TRL has no sum_then_normalize block"
    r = _rewards(1, g=g)
    scope = {
        "torch": torch,
        "nanstd": nanstd,
        "self": SimpleNamespace(scale_rewards=scale, reward_weights=torch.ones(1, dtype=D)),
        "rewards_per_func": r.unsqueeze(1).clone(),
        "device": r.device,
        "num_generations": g,
        "unscorable_mask": torch.zeros(r.numel(), dtype=torch.bool),
    }
    exec(compile(block, "<trl advantage block>", "exec"), scope)
    torch.testing.assert_close(group_advantages(r, g, scale, eps=1e-4), scope["advantages"], rtol=0, atol=TOL)
