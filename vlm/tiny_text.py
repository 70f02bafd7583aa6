"""A tiny random-weight text-only Qwen2, built offline: the model vLLM's CPU build can run.

vLLM on CPU cannot host Qwen2-VL (its image processor needs torchvision), so the vLLM engine is tested on
this: the same tokenizer, chat template and special tokens as the tiny VLM, and a head_dim of 64 (the
smallest the CPU attention kernels take). Cached like the tiny VLM.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.cache import build_key, build_once, models_dir
from vlm.tokenizer import padded_vocab_size, train_qwen_tokenizer

BUILDER_VERSION = 2


@dataclass
class TinyTextSpec:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 64
    num_key_value_heads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size // self.num_attention_heads < 64:
            raise ValueError(
                "head_dim (hidden_size / num_attention_heads) must be >= 64 for vLLM's CPU kernels"
            )


def build_tiny_text_lm(spec: TinyTextSpec, corpus: Sequence[str]):
    """Return (model, tokenizer): a Qwen2ForCausalLM with random weights and a tokenizer trained on
    `corpus`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_qwen_tokenizer(corpus, vocab_size=spec.vocab_size)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    # the VLM's vision token ids ride along in the config, so both engines block them here too
    # (vlm.inputs.vision_token_ids)
    vision = {key: tok.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2Config(
        vocab_size=padded_vocab_size(tok), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=2048, rope_theta=1e6,
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True, **vision)
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model, tok


def ensure_tiny_text_lm(spec: TinyTextSpec, corpus: Sequence[str],
                        cache_dir: str | Path | None = None) -> Path:
    """Build once and return the directory (config, safetensors weights, tokenizer), like a real
    checkpoint."""
    import transformers

    key = build_key(BUILDER_VERSION, transformers.__version__, dataclasses.asdict(spec), list(corpus))
    root = models_dir(cache_dir)

    def write(tmp: Path) -> None:
        model, tok = build_tiny_text_lm(spec, corpus)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_once(root / f"tiny-qwen2-text-{key}", "config.json", write)
