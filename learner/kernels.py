"""Which attention kernel and which Adam the learner uses, from `learner.attn_implementation` and
`learner.optimizer`, decided on the rank's own machine (what is installed there, whether it has CUDA)."""
from __future__ import annotations

import importlib.util
import shutil

from protocol.components import LearnerConfig


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attention(cfg: LearnerConfig, cuda: bool, bf16: bool, flash_installed: bool | None = None) -> str:
    """transformers' attn_implementation. auto = flash-attention 2 on CUDA in bf16 when flash_attn is
    installed (the `flash` extra), else PyTorch's SDPA; an explicit choice that cannot run is refused here,
    at start, instead of failing inside the first forward."""
    flash = flash_attn_installed() if flash_installed is None else flash_installed
    if cfg.attn_implementation == "auto":
        return "flash_attention_2" if cuda and bf16 and flash else "sdpa"
    if cfg.attn_implementation == "flash_attention_2":
        needs = (("a CUDA device", cuda), ("bf16 (learner.precision)", bf16),
                 ("the flash_attn package: pip install 'clsrl[flash]' --no-build-isolation", flash))
        missing = [why for why, ok in needs if not ok]
        if missing:
            raise ValueError(f"learner.attn_implementation=flash_attention_2 needs {'; '.join(missing)}; "
                             f"use auto or sdpa")
    return cfg.attn_implementation


def fused_adam_prebuilt() -> bool:
    """DeepSpeed's FusedAdam op came compiled with the wheel (DS_BUILD_FUSED_ADAM=1 installs)."""
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam"))


def adam_params(cfg: LearnerConfig, cuda: bool, prebuilt: bool | None = None,
                nvcc: bool | None = None) -> dict:
    """DeepSpeed's optimizer params beyond lr/betas/decay. DeepSpeed's FusedAdam compiles its CUDA op at first
    use with nvcc, which pip-installed (vLLM) environments lack: auto takes it on CUDA only when prebuilt or
    nvcc is on PATH, else torch's AdamW (its fused CUDA kernel on a GPU, no build; foreach on CPU, where
    DeepSpeed's CPU Adam would need a 1-2 min op build too)."""
    if cfg.optimizer == "deepspeed":
        if not cuda:
            raise ValueError("learner.optimizer=deepspeed (DeepSpeed's FusedAdam) needs a CUDA device; use "
                             "auto or torch")
        return {"torch_adam": False}
    if cfg.optimizer == "auto" and cuda:
        built = fused_adam_prebuilt() if prebuilt is None else prebuilt
        has_nvcc = shutil.which("nvcc") is not None if nvcc is None else nvcc
        if built or has_nvcc:
            return {"torch_adam": False}
    return {"torch_adam": True, "fused": True} if cuda else {"torch_adam": True}
