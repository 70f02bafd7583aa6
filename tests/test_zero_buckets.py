"""DeepSpeed's ZeRO buckets follow the model's size (Hugging Face's "auto" values), not DeepSpeed's fixed 5e8
elements, which a ZeRO-3 rank allocates as one 1.9 GiB fp32 buffer whatever the model."""
from __future__ import annotations

from learner.worker import deepspeed_config
from learner.zero_buckets import MIN_BUCKET, model_hidden_size, zero_buckets
from protocol.components import LearnerConfig


def test_buckets_are_the_hidden_size_squared_with_a_floor():
    assert zero_buckets(1536, 2) == {"reduce_bucket_size": MIN_BUCKET}  # Qwen2-VL-2B: 2.4M, under the floor
    assert zero_buckets(3584, 3) == {"reduce_bucket_size": 3584**2,  # Qwen2-VL-7B
                                     "stage3_prefetch_bucket_size": int(0.9 * 3584**2),
                                     "stage3_param_persistence_threshold": 35840}
    assert zero_buckets(64, 1) == {"reduce_bucket_size": MIN_BUCKET} and MIN_BUCKET < 5e8 / 100


def test_the_learners_deepspeed_config_carries_them(tiny_model_dir):
    hidden = model_hidden_size(tiny_model_dir)
    assert hidden > 0
    for stage in (1, 2, 3):
        cfg = deepspeed_config(LearnerConfig(zero_stage=stage), 2, 2, False, False, hidden)
        assert cfg["zero_optimization"] == {"stage": stage, **zero_buckets(hidden, stage)}
