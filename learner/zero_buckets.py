"""DeepSpeed's ZeRO communication buckets sized to the model, the way Hugging Face's DeepSpeed integration
fills its "auto" values.

DeepSpeed's own defaults are 5e8 elements per bucket whatever the model: a ZeRO-3 rank holds a 5e8-element
buffer (1.9 GiB in fp32; reserved outright on a GPU, written up to a whole gradient's worth on a CPU), and
ZeRO-1/2 fill a bucket of the same size before reducing. Buckets of hidden_size**2 elements keep that to a few
MiB per rank at no measured cost in step time (bench/limits_learner.py, BENCHMARKS.md).
"""
from __future__ import annotations

from pathlib import Path

MIN_BUCKET = 2**22  # elements (16 MiB in fp32): a small model is reduced in a few calls, not dozens


def zero_buckets(hidden_size: int, stage: int) -> dict[str, int]:
    """The zero_optimization entries that size DeepSpeed's buckets for a model of `hidden_size`."""
    square = max(hidden_size * hidden_size, MIN_BUCKET)
    if stage < 3:
        return {"reduce_bucket_size": square}
    return {"reduce_bucket_size": square, "stage3_prefetch_bucket_size": int(0.9 * square),
            "stage3_param_persistence_threshold": 10 * hidden_size}


def model_hidden_size(model_path: str | Path, trust_remote_code: bool = False) -> int:
    """The language model's hidden size, read from the checkpoint's config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size)
