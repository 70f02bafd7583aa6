"""Per-token log-probabilities of the sampling policy, computed the same way in rollout and learner.

The policy is the model's distribution at the sampling temperature with the vision special tokens blocked
(they are never sampled). Rollout applies this to the logits it sampled from; the learner to the logits of
a training forward; with the same weights the two agree to float precision, so the reported gap measures
engine drift, not a definition mismatch.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache

import torch

from vlm.inputs import SequenceBatch


def policy_scores(
    logits: torch.Tensor, temperature: float = 1.0, blocked_ids: Sequence[int] = ()
) -> torch.Tensor:
    """The sampling policy's logits: tempered, with `blocked_ids` at -inf (never sampled)."""
    scores = logits.float() / temperature
    if blocked_ids:
        blocked = torch.as_tensor(list(blocked_ids), device=scores.device)
        scores = scores.index_fill(-1, blocked, float("-inf"))
    return scores


def policy_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                    blocked_ids: Sequence[int] = ()) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature) with `blocked_ids` removed; shapes [..., V] ->
    [...]."""
    scores = policy_scores(logits, temperature, blocked_ids)
    # gather - logsumexp avoids materialising a full log_softmax copy of the logits
    picked = scores.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scores, dim=-1)


@cache
def forward_parameters(model_type: type) -> frozenset[str]:
    """The names the model's forward takes (what a transformers version supports differs)."""
    return frozenset(inspect.signature(model_type.forward).parameters)


def _encodes_apart(model_type: type) -> bool:
    """The model (transformers' Qwen2-VL, Qwen2.5-VL) takes precomputed vision features."""
    return (hasattr(model_type, "get_image_features")
            and "mm_encoder_outputs" in forward_parameters(model_type))


def keeps_positions(model_type: type) -> bool:
    """The model's forward projects only the positions it is given onto the vocabulary (`logits_to_keep`)."""
    return "logits_to_keep" in forward_parameters(model_type)


def model_outputs(model, batch: SequenceBatch, **kwargs):
    """The model's forward on a batch, the vision tower run once per distinct image rather than once per
    row: a group's G rows share their prompt's image, and encoding it G times cost the learner ~9% of its
    step on the 23M bench model. The rows then take the same features, so their gradients sum into one
    vision backward. `model` may be a DeepSpeed engine (its module is the transformers model)."""
    core = getattr(getattr(model, "module", model), "model", None)
    if core is None or not _encodes_apart(type(core)):
        return model(**batch.model_kwargs(), **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    distinct = core.get_image_features(batch.pixel_values, batch.distinct_grid_thw(), return_dict=True)
    rows = tuple(distinct.pooler_output[i] for i in batch.image_index.tolist())
    return model(**batch.model_kwargs(pixels=False),
                 mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=rows)}, **kwargs)


def completion_logits(model, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each completion token: ([N, T, V], targets [N, T], mask [N, T]) for T = longest."""
    width, device = batch.input_ids.shape[1], batch.input_ids.device
    steps = int(batch.completion_lens.max()) if len(batch.completion_lens) else 0
    offsets = torch.arange(steps, device=device)
    mask = offsets[None, :] < batch.completion_lens[:, None].to(device)
    # the logit at position t predicts token t+1, so completion token j is predicted at prompt_len + j - 1
    pos = (batch.prompt_lens[:, None].to(device) - 1 + offsets[None, :]).clamp(max=width - 1)
    targets = batch.input_ids.gather(1, (pos + 1).clamp(max=width - 1))
    if steps and keeps_positions(type(getattr(model, "module", model))):
        # only the span of completion positions meets the lm_head: with a real vocabulary (152k) and a few
        # hundred image tokens per prompt, the full [N, L, V] logits were most of a micro-batch's memory.
        # A 1-D range: transformers 5.19 (vLLM's pin) takes no per-row 2-D positions
        first = int(pos.min())
        span = torch.arange(first, int(pos.max()) + 1, device=device)
        logits = model_outputs(model, batch, logits_to_keep=span).logits
        pos = pos - first
    else:
        logits = model_outputs(model, batch).logits
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    return picked, targets * mask, mask


def completion_logprobs(model, batch: SequenceBatch, temperature: float = 1.0,
                        blocked_ids: Sequence[int] = (), with_entropy: bool = False):
    """Per-token policy log-probs of each row's completion: (logprobs [N, T], mask [N, T][, entropy
    [N, T]])."""
    logits, targets, mask = completion_logits(model, batch)
    logprobs = policy_logprobs(logits, targets, temperature, blocked_ids) * mask
    if with_entropy:
        with torch.no_grad():
            entropy = token_entropy(policy_scores(logits, temperature, blocked_ids)) * mask
        return logprobs, mask, entropy
    return logprobs, mask


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution for each position: ``[..., V] -> [...]``.

    Computed as ``logsumexp(z) - sum(softmax(z) * z)`` in float32 (or wider), which
    avoids the ``0 * -inf`` of ``p * log p`` on masked-out vocabulary entries.
    Call under ``torch.no_grad()`` when it is only a metric: it keeps a ``[..., V]``
    intermediate alive for backward otherwise.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z.nan_to_num(neginf=0.0)).sum(dim=-1)
