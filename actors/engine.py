"""The rollout-engine interface every backend (HF generate, vLLM) implements, and the factory for one."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from protocol.components import SamplingConfig, WeightSyncConfig
from protocol.config import RolloutConfig
from protocol.rollout import RolloutGroup, RolloutRequest


class RolloutEngine(Protocol):
    """Every method a rollout worker, an eval worker or a test calls on an engine (HFEngine, VLLMEngine)."""

    policy_version: int  # the weights' version: 0 at start, then the step that produced them

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, seed: int | None = None,
                 interruptible: bool = True) -> list[RolloutGroup]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int: ...

    def join_weight_group(self, host: str, port: int, first_rank: int, num_ranks: int, cfg: WeightSyncConfig,
                          name: str) -> list[str]: ...

    def receive_weights(self, timeout_s: float) -> dict: ...  # {"version", "tensors"} of one broadcast

    def leave_weight_group(self) -> None: ...

    def sleep(self) -> None: ...  # colocated: release the device until load_ipc

    def load_ipc(self, handles: list, version: int) -> int: ...  # colocated: wake and load; tensors loaded

    def checksums(self) -> dict[str, str]: ...  # a SHA-256 per parameter (weights/checksum.py)


def make_engine(rollout: RolloutConfig, model_path: str, trust_remote_code: bool, seed: int) -> RolloutEngine:
    """The engine `rollout.engine` names."""
    if rollout.engine == "vllm":
        from actors.vllm_engine import VLLMEngine, engine_options

        options = engine_options(model_path, rollout, rollout.dtype, seed, rollout.colocate)
        return VLLMEngine(options, trust_remote_code)
    from actors.hf_engine import HFEngine

    return HFEngine(
        model_path,
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype=engine_dtype(rollout.dtype),
        trust_remote_code=trust_remote_code,
        partial_rollout=rollout.partial_rollout,  # hosted with max_concurrency=2 then (cluster/job.py)
    )


def engine_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
