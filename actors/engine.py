"""The rollout-engine interface every backend (HF generate, vLLM) implements, and its data types."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from protocol.components import SamplingConfig
from protocol.rollout import RolloutGroup, RolloutRequest


class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, seed: int | None = None,
                 interruptible: bool = True) -> list[RolloutGroup]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int: ...


def make_engine(rollout, model_path: str, trust_remote_code: bool, seed: int):
    """The engine `rollout.engine` names (a `protocol.config.RolloutConfig`)."""
    if rollout.engine == "vllm":
        from actors.vllm_engine import VLLMEngine, engine_options

        return VLLMEngine(engine_options(model_path, rollout, rollout.dtype, seed, rollout.colocate), trust_remote_code)
    from actors.hf_engine import HFEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFEngine(model_path, device=device, dtype=engine_dtype(rollout.dtype), trust_remote_code=trust_remote_code,
                    partial_rollout=rollout.partial_rollout)  # hosted with max_concurrency=2 then (cluster/job.py)


def engine_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
