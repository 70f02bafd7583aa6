"""A tiny random-weight Qwen2-VL / Qwen2.5-VL built offline, saved like a real checkpoint.

Tests and the embedded default cannot download weights, so they build a small model from a config, save it
with `save_pretrained`, and then load it back through exactly the path a real checkpoint (for example
Qwen2-VL-2B-Instruct) takes. Builds are cached by a hash of everything that shapes them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from protocol.components import TinyVLMSpec
from vlm.cache import build_key, build_once, models_dir
from vlm.tokenizer import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    padded_vocab_size,
    train_qwen_tokenizer,
)

BUILDER_VERSION = 1  # bump when the build changes, so caches rebuild

# vLLM's CPU attention kernels take head_dim >= 64 only, in the language model and the vision tower alike
# (the vision tower has 2 heads): the spec the vLLM tests and benchmarks run. The default spec stays as is.
VLLM_CPU_SPEC = TinyVLMSpec(num_attention_heads=2, num_key_value_heads=1, vision_hidden_size=128)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # sections cover half the head dim (temporal, height, width)
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny_vlm(spec: TinyVLMSpec, corpus: Sequence[str]):
    """Return (model, processor) with random weights and a tokenizer trained on `corpus`."""
    from transformers import Qwen2VLImageProcessor

    from vlm.processor import Qwen2VLImageOnlyProcessor, torchvision_usable

    # the PIL backend is what transformers falls back to anyway, minus the warning
    if not torchvision_usable():
        from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
    tok = train_qwen_tokenizer(corpus, vocab_size=spec.vocab_size)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    processor = Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok,
                                          chat_template=QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    text = dict(
        vocab_size=padded_vocab_size(tok), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": _mrope_section(head_dim)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=True)
    if spec.kind == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden_size,
                      hidden_size=spec.hidden_size, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                      intermediate_size=2 * spec.vision_hidden_size, num_heads=2,
                      out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[spec.vision_depth - 1])
    torch.manual_seed(spec.seed)
    model = Model(Config(text_config=text, vision_config=vision, **common))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


def tiny_vlm_key(spec: TinyVLMSpec, corpus: Sequence[str]) -> str:
    import transformers

    return build_key(BUILDER_VERSION, transformers.__version__, dataclasses.asdict(spec), list(corpus))


def ensure_tiny_vlm(spec: TinyVLMSpec, corpus: Sequence[str], cache_dir: str | Path | None = None) -> Path:
    """Build the tiny model once and return its directory; concurrent callers wait on a file lock."""
    root = models_dir(cache_dir)

    def write(tmp: Path) -> None:
        from vlm.processor import save_processor

        model, processor = build_tiny_vlm(spec, corpus)
        model.save_pretrained(tmp)
        save_processor(processor, tmp)

    return build_once(root / f"tiny-{spec.kind}-{tiny_vlm_key(spec, corpus)}", "config.json", write)
