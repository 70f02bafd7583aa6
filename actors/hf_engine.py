"""Rollout with Hugging Face `generate`: the engine on CPUs, and a fallback on GPUs without vLLM.

Generation and weight updates may come from two threads (a threaded Ray actor): `gate` makes an update
wait for the generate call in flight, which with `partial_rollout` is interrupted and continued under the
new weights (vlm/partial.py) and otherwise finishes first.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from protocol.components import SamplingConfig, WeightSyncConfig
from protocol.rollout import RolloutGroup, RolloutRequest
from vlm.generation import sample_completions
from vlm.partial import WeightGate, sample_in_segments
from weights.checksum import checksums
from weights.receiver import WeightReceiver


def load_policy(model_path: str | Path, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer[, processor]) for a vision-language checkpoint, or a text-only one (vLLM's CPU test
    model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    remote = dict(trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(model_path, **remote)
    if getattr(config, "vision_config", None) is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **remote)
        return model, AutoTokenizer.from_pretrained(model_path, **remote), None
    from vlm.processor import load_processor

    processor = load_processor(model_path, trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype, **remote)
    return model, processor.tokenizer, processor


class HFEngine:
    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False, partial_rollout: bool = False) -> None:
        model, self.tokenizer, self.processor = load_policy(model_path, dtype, trust_remote_code)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.asleep = False
        self.model.requires_grad_(False)
        self.policy_version = 0
        self.partial_rollout = partial_rollout
        self.gate = WeightGate()
        self.receiver: WeightReceiver | None = None

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, seed: int | None = None,
                 interruptible: bool = True) -> list[RolloutGroup]:
        """Groups stamped with the version their first token was sampled with (the oldest, when partial
        rollout continued some completions under newer weights: each completion's `versions` says which
        token had which)."""
        if not requests:
            return []
        if self.asleep:
            raise RuntimeError("generate() while the engine sleeps (colocated mode): load_ipc() wakes it")
        prompts = [r.inputs for r in requests]
        tok = self.tokenizer
        images = None if self.processor is None else self.processor.image_processor
        if self.partial_rollout and interruptible:
            groups = sample_in_segments(self.model, tok, prompts, sampling, self.gate,
                                        lambda: self.policy_version, seed, images)
        else:
            with self.gate.segment():
                version = self.policy_version
                groups = sample_completions(self.model, tok, prompts, sampling, seed, images)
            for c in (c for g in groups for c in g):
                c.versions = [version] * len(c.token_ids)
        return [RolloutGroup(r, g, min(c.versions[0] for c in g)) for r, g in zip(requests, groups)]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Copy received tensors into the model by name; returns how many were loaded.

        A name or shape that does not fit is an error naming it, before anything is copied: a partial
        update would leave the engine sampling from a policy the learner never had. Waits for the generate
        call in flight to end (or, with partial rollout, to be interrupted).
        """
        params = dict(self.model.named_parameters())
        named_tensors = list(named_tensors)
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"engine has no parameter {name!r} (version {version})")
            if params[name].shape != tensor.shape:
                raise ValueError(f"parameter {name!r}: engine shape {tuple(params[name].shape)}, "
                                 f"received {tuple(tensor.shape)} (version {version})")
        with self.gate.update():
            for name, tensor in named_tensors:
                params[name].copy_(tensor)
            self.policy_version = version
        return len(named_tensors)

    # ---- the weight group (the same calls as the vLLM engine's) ----

    def join_weight_group(self, host: str, port: int, first_rank: int, num_ranks: int,
                          cfg: WeightSyncConfig, name: str) -> list[str]:
        """Leave any previous group and join the one at host:port as `first_rank` (blocks until it forms)."""
        self.leave_weight_group()
        self.receiver = WeightReceiver(host, port, first_rank, num_ranks, cfg, name=name)
        return [name]

    def receive_weights(self, timeout_s: float | None = None) -> dict:
        """With partial rollout (a threaded actor) this runs while generate() samples: the transfer overlaps
        generation, and only the copy interrupts it."""
        if self.receiver is None:
            raise RuntimeError("receive_weights before join_weight_group")
        version, named = self.receiver.receive()
        return {"version": version, "tensors": self.update_weights(named, version)}

    def leave_weight_group(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    # ---- colocated mode (rollout.colocate): the engine sleeps while its device's learner rank trains ----

    def sleep(self) -> None:
        """Free the GPU for the learner: weights go to host memory (on CPU there is nothing to free)."""
        with self.gate.update():
            if self.device.type == "cuda":
                self.model.to("cpu")
                torch.cuda.empty_cache()
            self.asleep = True

    def load_ipc(self, handles: list, version: int) -> int:
        """Wake, then copy in the learner's tensors from their IPC handles (weights/ipc.py)."""
        from weights.ipc import rebuild

        if self.asleep:
            self.model.to(self.device)
            self.asleep = False
        return self.update_weights(rebuild(handles, self.device), version)

    def checksums(self) -> dict[str, str]:
        """A SHA-256 per parameter (weights/checksum.py) under the learner's names: equal to its dict iff
        the weights are bit-equal."""
        return checksums(self.model.named_parameters())
