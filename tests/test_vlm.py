"""The tiny offline VLM and the model I/O shared by rollout and learner."""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from transformers import AutoModelForImageTextToText

from learner.objective import pad_rows
from protocol.components import SamplingConfig, TinyVLMSpec
from tasks.examples import build_examples
from vlm.generation import _generation_config, generate_segment, sample_completions
from vlm.inputs import build_sequence_batch, encode_prompt, left_pad_prompts, vision_token_ids
from vlm.logprobs import completion_logprobs, policy_logprobs
from vlm.processor import Qwen2VLImageOnlyProcessor, load_processor
from vlm.tiny import ensure_tiny_vlm


def _examples(processor, dataset, n=3, style="cls_rl"):
    examples, skipped = build_examples(processor, dataset, dataset.split("train")[:n], style, 56 * 56, 112 * 112, seed=0)
    assert not skipped
    return examples


def _max_logprob_gap(model, processor, prompts, cfg):
    groups = sample_completions(model, processor.tokenizer, prompts, cfg, seed=1, image_processor=processor.image_processor)
    comps = [c for g in groups for c in g]
    rows = [p for p, g in zip(prompts, groups) for _ in g]
    batch = build_sequence_batch(rows, [c.token_ids for c in comps], model.generation_config.pad_token_id,
                                 model.config.image_token_id, processor.image_processor)
    with torch.no_grad():
        lp, mask = completion_logprobs(model, batch, cfg.temperature, vision_token_ids(model.config))
    old = pad_rows([c.logprobs for c in comps], lp.shape[1])
    assert mask.sum() == sum(len(c.token_ids) for c in comps)
    return float(((lp - old).abs() * mask).max()), comps


def test_tiny_model_reloads_like_a_checkpoint(tiny_model_dir, tiny_policy):
    model, processor = tiny_policy
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert isinstance(processor, Qwen2VLImageOnlyProcessor)  # no torchvision on CPU machines
    assert processor.tokenizer.chat_template and "<|image_pad|>" in processor.tokenizer.get_vocab()
    assert (tiny_model_dir / "model.safetensors").exists()


def test_tiny_model_cache_is_reused(shapes_dataset, tiny_model_dir):
    from tasks.examples import tokenizer_corpus

    stamp = (tiny_model_dir / "config.json").stat().st_mtime_ns
    again = ensure_tiny_vlm(TinyVLMSpec(), tokenizer_corpus([shapes_dataset]))
    assert again == tiny_model_dir and (again / "config.json").stat().st_mtime_ns == stamp
    other = ensure_tiny_vlm(TinyVLMSpec(seed=1), tokenizer_corpus([shapes_dataset]))
    assert other != tiny_model_dir


def test_rollout_and_learner_logprobs_agree(tiny_policy, shapes_dataset):
    model, processor = tiny_policy
    prompts = [e.inputs for e in _examples(processor, shapes_dataset)]  # different lengths: left-padded in generate
    gap, comps = _max_logprob_gap(model, processor, prompts, SamplingConfig(n=4, max_new_tokens=12, temperature=0.8))
    assert gap < 1e-5
    assert all(c.finish_reason in ("stop", "length") and len(c.token_ids) == len(c.logprobs) for c in comps)


def test_sampling_never_emits_vision_tokens(tiny_policy, shapes_dataset):
    model, processor = tiny_policy
    prompts = [e.inputs for e in _examples(processor, shapes_dataset, n=2)]
    groups = sample_completions(model, processor.tokenizer, prompts, SamplingConfig(n=16, max_new_tokens=24), seed=3, image_processor=processor.image_processor)
    blocked = set(vision_token_ids(model.config))
    assert len(blocked) == 4
    assert not any(blocked & set(c.token_ids) for g in groups for c in g)


def test_greedy_is_deterministic_and_single(tiny_policy, shapes_dataset):
    model, processor = tiny_policy
    prompts = [e.inputs for e in _examples(processor, shapes_dataset, n=2)]
    cfg = SamplingConfig(n=4, max_new_tokens=10, greedy=True)
    a = sample_completions(model, processor.tokenizer, prompts, cfg, image_processor=processor.image_processor)
    b = sample_completions(model, processor.tokenizer, prompts, cfg, image_processor=processor.image_processor)
    assert [len(g) for g in a] == [1, 1]
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]


def test_samples_of_a_prompt_share_one_forward_over_it_and_are_what_generate_samples(tiny_policy, shapes_dataset):
    """G samples of a prompt share one forward over the prompt (image tokens included), not G: and they are
    the tokens and log-probs that generate's own expansion (num_return_sequences) samples for the same seed."""
    model, processor = tiny_policy
    prompts = [e.inputs for e in _examples(processor, shapes_dataset)]  # different lengths: left-padded
    inputs = left_pad_prompts(prompts, model.generation_config.pad_token_id, model.config.image_token_id,
                              processor.image_processor)
    cfg, width = SamplingConfig(n=4, max_new_tokens=6), inputs["input_ids"].shape[1]
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    torch.manual_seed(7)
    ids, logprobs = generate_segment(model, inputs, cfg, 4, 6)
    hook.remove()
    assert seen[0] == (3, width - 1) and set(seen[1:]) == {(12, 1)}, seen  # the prompts once, then one token a step

    torch.manual_seed(7)
    ref = model.generate(**inputs, generation_config=_generation_config(model, cfg, 4, 6))
    ref_ids = ref.sequences[:, width:]
    assert ids == ref_ids.tolist()
    ref_logprobs = policy_logprobs(torch.stack(ref.logits, dim=1), ref_ids, cfg.temperature,
                                   vision_token_ids(model.config))
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-5)


def test_stop_token_ends_completion(tiny_policy, shapes_dataset):
    model, processor = tiny_policy
    prompts = [e.inputs for e in _examples(processor, shapes_dataset, n=2)]
    groups = sample_completions(model, processor.tokenizer, prompts, SamplingConfig(n=16, max_new_tokens=6), seed=0, image_processor=processor.image_processor)
    eos = model.generation_config.eos_token_id
    for c in (c for g in groups for c in g):
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 6 and eos not in c.token_ids


def test_mm_token_type_ids_match_the_processor(tiny_policy, shapes_dataset):
    model, processor = tiny_policy
    from tasks.images import load_image

    img = load_image(shapes_dataset.split("train")[0].image, 56 * 56, 112 * 112)
    prompt = encode_prompt(processor, img, "What colour?")
    enc = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True)], images=[img], return_tensors="pt")
    batch = build_sequence_batch([prompt], [[5, 6]], 0, model.config.image_token_id, processor.image_processor)
    assert torch.equal(batch.mm_token_type_ids[0, : len(prompt)], enc["mm_token_type_ids"][0])
    assert int(prompt.image_grid_thw.prod()) // 4 == int((prompt.input_ids == model.config.image_token_id).sum())


def test_qwen2_5_vl_builds_and_agrees(tmp_path, shapes_dataset):
    from tasks.examples import tokenizer_corpus

    path = ensure_tiny_vlm(TinyVLMSpec(kind="qwen2_5_vl"), tokenizer_corpus([shapes_dataset]), cache_dir=tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = load_processor(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    prompts = [e.inputs for e in _examples(processor, shapes_dataset, n=2)]
    gap, _ = _max_logprob_gap(model, processor, prompts, SamplingConfig(n=3, max_new_tokens=8))
    assert gap < 1e-5


def test_training_forward_backpropagates(tiny_model_dir, shapes_dataset):
    from learner.objective import sft_objective

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = load_processor(tiny_model_dir)
    ex = _examples(processor, shapes_dataset, n=2)
    batch = build_sequence_batch([e.inputs for e in ex], [[10, 11, 12], [13]], model.generation_config.pad_token_id,
                                 model.config.image_token_id, processor.image_processor)
    loss = sft_objective(model, batch)
    loss.backward()
    vision_grad = model.model.visual.patch_embed.proj.weight.grad
    assert torch.isfinite(loss) and vision_grad is not None and vision_grad.abs().sum() > 0


def _logprobs_and_grads(model, batch, **replaced):
    """completion_logprobs of `batch` and the gradients of their sum, with the named vlm.logprobs helpers
    replaced for the call (to compare a path against the plain one)."""
    import vlm.logprobs

    model.zero_grad()
    with mock.patch.multiple(vlm.logprobs, **replaced) if replaced else contextlib.nullcontext():
        lp, mask = completion_logprobs(model, batch, 1.0, vision_token_ids(model.config))
    (lp * mask).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_forward_encodes_each_image_once(tiny_model_dir, shapes_dataset):
    """Rows repeating a prompt (a group's G completions) share one vision-tower pass: the same log-probs bit
    for bit and the same gradients (to summation order) as encoding every row's copy of the image."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = load_processor(tiny_model_dir)
    prompts = [e.inputs for e in _examples(processor, shapes_dataset, n=2)]
    rows = [prompts[0]] * 3 + [prompts[1]] * 2
    completions = [[10, 11, 12], [13], [14, 15], [10], [11, 12]]
    pad, image_id = model.generation_config.pad_token_id, model.config.image_token_id
    batch = build_sequence_batch(rows, completions, pad, image_id, processor.image_processor)
    assert batch.image_index.tolist() == [0, 0, 0, 1, 1]
    # each image's patches once
    assert batch.pixel_values.shape[0] == sum(int(p.image_grid_thw.prod()) for p in prompts)
    encoded = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))

    shared = _logprobs_and_grads(model, batch)
    # the plain call: every row's patches through the vision tower
    per_row = _logprobs_and_grads(model, batch, _encodes_apart=lambda model_type: False)
    hook.remove()
    assert encoded == [batch.pixel_values.shape[0], batch.row_pixel_values().shape[0]]
    assert torch.equal(shared[0], per_row[0])
    assert shared[1].keys() == per_row[1].keys()
    for name, grad in per_row[1].items():
        torch.testing.assert_close(shared[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_forward_projects_only_completion_positions(tiny_model_dir, shapes_dataset):
    """The lm_head sees only the span of completion positions (not the prompts' image and text tokens), and
    the log-probs and gradients equal those taken from the full-sequence logits."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = load_processor(tiny_model_dir)
    prompts = [e.inputs for e in _examples(processor, shapes_dataset, n=2)]
    completions = [[10, 11, 12], [13], [14, 15, 16, 17]]
    batch = build_sequence_batch([prompts[0], prompts[0], prompts[1]], completions,
                                 model.generation_config.pad_token_id, model.config.image_token_id,
                                 processor.image_processor)
    projected = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: projected.append(tuple(args[0].shape[:2])))

    kept = _logprobs_and_grads(model, batch)
    full = _logprobs_and_grads(model, batch, keeps_positions=lambda model_type: False)
    hook.remove()
    span = int((batch.prompt_lens + batch.completion_lens).max() - batch.prompt_lens.min())
    assert span < batch.input_ids.shape[1] // 2
    assert projected == [(3, span), tuple(batch.input_ids.shape)]
    torch.testing.assert_close(kept[0], full[0], rtol=1e-5, atol=1e-6)
    assert kept[1].keys() == full[1].keys()
    for name, grad in full[1].items():
        torch.testing.assert_close(kept[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
