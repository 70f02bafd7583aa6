"""Rollout with Hugging Face `generate`: the engine on CPUs, and a fallback on GPUs without vLLM."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from actors.engine import RolloutGroup, RolloutRequest
from vlm.generation import SamplingConfig, sample_completions
from vlm.processor import load_processor


class HFEngine:
    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForImageTextToText

        self.processor = load_processor(model_path, trust_remote_code)
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        self.model.requires_grad_(False)
        self.policy_version = 0

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig,
                 seed: int | None = None) -> list[RolloutGroup]:
        if not requests:
            return []
        groups = sample_completions(self.model, self.processor.tokenizer, [r.inputs for r in requests], sampling, seed)
        return [RolloutGroup(r, g, self.policy_version) for r, g in zip(requests, groups)]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Copy received tensors into the model by name; returns how many were loaded.

        A name or shape that does not fit is an error naming it: a silent partial update would leave the
        engine sampling from a policy the learner never had.
        """
        params = dict(self.model.named_parameters())
        loaded = 0
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"engine has no parameter {name!r} (version {version})")
            if params[name].shape != tensor.shape:
                raise ValueError(f"parameter {name!r}: engine shape {tuple(params[name].shape)}, "
                                 f"received {tuple(tensor.shape)} (version {version})")
            params[name].copy_(tensor)
            loaded += 1
        self.policy_version = version
        return loaded
