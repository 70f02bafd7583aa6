"""learner/kernels.py: the attention kernel and the Adam a learner rank picks on its machine."""
from __future__ import annotations

import pytest

from learner.kernels import adam_params, attention
from protocol.components import LearnerConfig


@pytest.mark.parametrize("cuda, bf16, flash, want", [
    (False, False, False, "sdpa"), (False, True, True, "sdpa"),  # CPU: no flash-attention kernels
    (True, True, True, "flash_attention_2"),
    (True, True, False, "sdpa"),  # not installed: no `flash` extra
    (True, False, True, "sdpa"),  # flash-attention 2 runs fp16/bf16 only
])
def test_auto_takes_flash_attention_2_only_where_it_can_run(cuda, bf16, flash, want):
    assert attention(LearnerConfig(), cuda, bf16, flash_installed=flash) == want


def test_an_explicit_kernel_is_kept_or_refused_at_start_naming_what_is_missing():
    assert attention(LearnerConfig(attn_implementation="eager"), True, True, flash_installed=True) == "eager"
    flash = LearnerConfig(attn_implementation="flash_attention_2")
    assert attention(flash, True, True, flash_installed=True) == "flash_attention_2"
    with pytest.raises(ValueError) as err:
        attention(flash, cuda=False, bf16=False, flash_installed=False)
    msg = str(err.value)
    assert msg.startswith("learner.attn_implementation=flash_attention_2 needs a CUDA device; bf16")
    assert "pip install 'clsrl[flash]' --no-build-isolation" in msg


@pytest.mark.parametrize("optimizer, cuda, prebuilt, nvcc, want", [
    ("auto", False, False, False, {"torch_adam": True}),
    ("auto", True, False, False, {"torch_adam": True, "fused": True}),  # a pip-installed vLLM env: no nvcc
    ("auto", True, True, False, {"torch_adam": False}),  # FusedAdam shipped compiled
    ("auto", True, False, True, {"torch_adam": False}),  # nvcc there: FusedAdam builds at first use
    ("torch", True, True, True, {"torch_adam": True, "fused": True}),
    ("deepspeed", True, False, False, {"torch_adam": False}),
])
def test_fused_adam_only_where_it_is_built_or_can_be(optimizer, cuda, prebuilt, nvcc, want):
    assert adam_params(LearnerConfig(optimizer=optimizer), cuda, prebuilt=prebuilt, nvcc=nvcc) == want


def test_deepspeeds_fused_adam_on_a_cpu_is_refused():
    with pytest.raises(ValueError, match="learner.optimizer=deepspeed .* needs a CUDA device"):
        adam_params(LearnerConfig(optimizer="deepspeed"), cuda=False)
