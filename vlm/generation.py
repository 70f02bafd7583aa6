"""Sampling G completions per prompt with Hugging Face `generate` (the CPU engine, and a GPU fallback)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from protocol.components import SamplingConfig
from protocol.rollout import Completion, PromptInputs
from vlm.inputs import left_pad_prompts, vision_token_ids
from vlm.logprobs import forward_parameters, keeps_positions, policy_logprobs

# the per-row inputs a prompt's samples repeat; pixels are not among them: the shared cache holds the image
ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def _generation_config(model, cfg: SamplingConfig, n: int, max_new_tokens: int):
    from transformers import GenerationConfig

    # Built from scratch: real checkpoints ship near-greedy defaults (e.g. top_k=1) that must not leak in.
    gen = model.generation_config
    kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=gen.eos_token_id,
                  pad_token_id=gen.pad_token_id, suppress_tokens=vision_token_ids(model.config),
                  return_dict_in_generate=True, output_logits=True)
    if cfg.greedy:
        return GenerationConfig(do_sample=False, **kwargs)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            **kwargs)


def eos_token_ids(model) -> set[int]:
    ids = model.generation_config.eos_token_id
    return set(ids if isinstance(ids, list) else [ids])


def _cache_argument(model_type: type) -> str:
    """What the model calls its KV cache: `cache` from transformers 5.20, `past_key_values` before (vLLM's
    CPU build pins 5.19)."""
    return "cache" if "cache" in forward_parameters(model_type) else "past_key_values"


def shared_prefill(model, inputs: dict, n: int) -> dict | None:
    """generate's inputs for `n` samples of each row with the rows' prompts run through the model once.
    `num_return_sequences` repeats every row n times before the first forward, so the prompt (hundreds of
    image tokens at real sizes) was computed n times over; here all but its last token is, once, and the
    KV cache repeated n times, and generate goes on from the last token: the same logits, so the same samples
    for the same seed. None where there is nothing to share (n = 1, or the last token is not text)."""
    ids, kinds = inputs["input_ids"], inputs.get("mm_token_type_ids")
    if n == 1 or ids.shape[1] < 2 or (kinds is not None and bool(kinds[:, -1].any())):
        return None
    name = _cache_argument(type(model))
    head = {k: v[:, :-1] if k in ROW_KEYS else v for k, v in inputs.items()}
    keep = {"logits_to_keep": 1} if keeps_positions(type(model)) else {}
    kv = getattr(model(**head, use_cache=True, **keep), name)
    kv.batch_repeat_interleave(n)
    core = getattr(model, "model", None)
    if getattr(core, "rope_deltas", None) is not None:  # Qwen2-VL's image position offsets, one per row
        core.rope_deltas = core.rope_deltas.repeat_interleave(n, dim=0)
    return {**{k: v.repeat_interleave(n, dim=0) for k, v in inputs.items() if k in ROW_KEYS}, name: kv}


@torch.no_grad()
def generate_segment(model, inputs: dict, cfg: SamplingConfig, n: int, max_new_tokens: int,
                     stopping_criteria=None) -> tuple[list[list[int]], torch.Tensor]:
    """One `generate` call on left-padded `inputs`, each row sampled `n` times: (new token ids per row, their
    behaviour log-probs [rows, steps] on the CPU). Rows that stopped early are padded after their stop
    token."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    shared = shared_prefill(model, inputs, n)
    out = model.generate(**(shared or inputs), stopping_criteria=stopping_criteria,
                         generation_config=_generation_config(model, cfg, 1 if shared else n, max_new_tokens))
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, dim=1)  # raw logits, [rows, steps, V]
    logprobs = policy_logprobs(logits, new_tokens, 1.0 if cfg.greedy else cfg.temperature,
                               vision_token_ids(model.config)).cpu()
    return new_tokens.cpu().tolist(), logprobs


def stop_index(ids: Sequence[int], eos_ids: set[int]) -> int | None:
    """Position of the first stop token in `ids`, or None."""
    return next((i for i, t in enumerate(ids) if t in eos_ids), None)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[PromptInputs], cfg: SamplingConfig,
                       seed: int | None = None, image_processor=None) -> list[list[Completion]]:
    """For each prompt, `cfg.n` completions (1 when greedy) with their behaviour log-probs; the prompts'
    patches are built from their images by `image_processor`."""
    n = 1 if cfg.greedy else cfg.n
    inputs = left_pad_prompts(prompts, model.generation_config.pad_token_id,
                              getattr(model.config, "image_token_id", None), image_processor)
    if seed is not None:
        torch.manual_seed(seed)
    rows, logprobs = generate_segment(model, inputs, cfg, n, cfg.max_new_tokens)
    eos_ids = eos_token_ids(model)
    completions = []
    for r, ids in enumerate(rows):
        stop = stop_index(ids, eos_ids)
        keep = len(ids) if stop is None else stop + 1
        completions.append(Completion(
            token_ids=ids[:keep], logprobs=logprobs[r, :keep].tolist(),
            text=tokenizer.decode(ids[:keep], skip_special_tokens=True),
            finish_reason="length" if stop is None else "stop"))
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]
