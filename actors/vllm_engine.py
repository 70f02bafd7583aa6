"""Rollout with vLLM, behind the same interface as the HF engine (actors/engine.py).

Prompts arrive encoded (`PromptInputs`: token ids with the image's run of `<|image_pad|>`, and the resized
image in 8 bits). vLLM wants one placeholder per image plus the image, and expands the placeholder itself:
the run is collapsed and the image handed over as the learner has it, so vLLM sees the pixels the learner
trains on; the number of image tokens it ran is checked against ours. After every weight load the prefix
and encoder caches are dropped: both hold results of the old weights, and vLLM's scheduler would otherwise
still list images whose encoder outputs the reload threw away (the next request for such an image fails
with "Encoder cache miss"). Weights arrive
inside vLLM's workers (the worker extension joins the learners' weight group), or colocated through IPC
handles while the engine is awake.
All vLLM calls go through actors/vllm_adapter.py.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import torch

from actors import vllm_adapter as adapter
from protocol.components import SamplingConfig, WeightSyncConfig
from protocol.rollout import Completion, PromptInputs, RolloutGroup, RolloutRequest
from vlm.inputs import vision_token_ids


def prompt_image(inputs: PromptInputs):
    """The prompt's image as PIL, as the processor resized it (uint8 [H, W, 3]): its sides are multiples of
    the patch grid, so vLLM's processor keeps its size and makes the learner's patches."""
    from PIL import Image

    return Image.fromarray(inputs.image.to(torch.uint8).cpu().numpy(), mode="RGB")


def collapse_image_runs(ids: list[int], image_token_id: int | None) -> list[int]:
    """Each run of image tokens becomes one (vLLM expands it again from the image)."""
    if image_token_id is None:
        return list(ids)
    # keep a token unless it is an image token right after another one
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def check_image_tokens(prompt_id: str, ours: list[int], ran: list[int] | None,
                       image_token_id: int | None) -> None:
    """vLLM must expand the image into as many tokens as the learner's prompt has, or the two train and
    sample different sequences. (`ran` None, or one image token: this vLLM reports the prompt before
    expansion.)"""
    if ran is None or image_token_id is None:
        return
    n_ours = ours.count(image_token_id)
    n_ran = ran.count(image_token_id)
    if n_ran > 1 and n_ran != n_ours:
        raise ValueError(f"prompt {prompt_id}: vLLM expanded the image into {n_ran} tokens, the learner's "
                         f"prompt has {n_ours}; the checkpoint's preprocessor min_pixels/max_pixels must "
                         f"match data.min_pixels/max_pixels")


class VLLMEngine:
    def __init__(self, opts: adapter.LLMOptions, trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if opts.enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("rollout.colocate needs CUDA GPUs (vLLM's sleep mode and CUDA IPC handles)")
        self.opts = opts
        config = AutoConfig.from_pretrained(opts.model, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(opts.model, trust_remote_code=trust_remote_code)
        vision = getattr(config, "vision_config", None) is not None
        self.image_token_id = getattr(config, "image_token_id", None) if vision else None
        self.blocked = self.tokenizer.convert_ids_to_tokens(vision_token_ids(config))
        self.opts = dataclasses.replace(opts, vision=vision)
        self.llm = adapter.create_llm(self.opts)
        self.policy_version = 0
        self.asleep = False
        self.lock = threading.Lock()  # one call into the LLM at a time (a threaded actor may overlap them)

    # ---- rollout ----

    def _prompt(self, inputs: PromptInputs) -> dict:
        ids = inputs.input_ids.tolist()
        if inputs.image is None:
            return adapter.prompt(ids)
        if self.image_token_id is None:
            raise ValueError(f"prompt has an image but {self.opts.model} is not a vision-language model")
        return adapter.prompt(collapse_image_runs(ids, self.image_token_id), prompt_image(inputs))

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig, seed: int | None = None,
                 interruptible: bool = True) -> list[RolloutGroup]:
        """G samples per request with their behaviour log-probs, stamped with the engine's policy version.
        (`interruptible` is the HF engine's partial rollout; the config refuses it with vLLM.)"""
        if not requests:
            return []
        n = 1 if sampling.greedy else sampling.n
        params = [adapter.sampling_params(n, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                          sampling.top_k, sampling.greedy,
                                          None if seed is None else (seed + i) % 2**63, self.blocked)
                  for i in range(len(requests))]
        prompts = [self._prompt(r.inputs) for r in requests]
        with self.lock:
            if self.asleep:
                raise RuntimeError("generate() while the engine sleeps (colocated mode): wake_up() first")
            version = self.policy_version
            results = adapter.generate(self.llm, prompts, params)
        groups = []
        for r, (ran, samples) in zip(requests, results):
            check_image_tokens(r.prompt_id, r.inputs.input_ids.tolist(), ran, self.image_token_id)
            completions = [Completion(s.token_ids, s.logprobs,
                                      self.tokenizer.decode(s.token_ids, skip_special_tokens=True),
                                      s.finish_reason, versions=[version] * len(s.token_ids))
                           for s in samples]
            groups.append(RolloutGroup(r, completions, version))
        return groups

    # ---- weights ----

    def join_weight_group(self, host: str, port: int, first_rank: int, num_ranks: int,
                          cfg: WeightSyncConfig, name: str) -> list[str]:
        """Every worker joins as ranks first_rank .. first_rank + tensor_parallel_size - 1."""
        args = (host, port, first_rank, num_ranks, vars(cfg).copy(), name)
        with self.lock:
            return adapter.collective_rpc(self.llm, "clsrl_join_weight_group", args,
                                          timeout=cfg.timeout_s * 3)

    def receive_weights(self, timeout_s: float) -> dict:
        """Blocks until every worker holds the new version; then old prefix-cache entries are dropped."""
        with self.lock:
            got = adapter.collective_rpc(self.llm, "clsrl_receive_weights", timeout=timeout_s)
            versions = {v for v, _ in got}
            if len(versions) != 1:
                raise RuntimeError(f"tensor-parallel workers loaded different versions {sorted(versions)}")
            adapter.reset_caches(self.llm)
            self.policy_version = versions.pop()
        return {"version": self.policy_version, "tensors": got[0][1]}

    def load_ipc(self, handles: list[tuple[str, tuple]], version: int) -> int:
        """Colocated: load tensors the learner shared through IPC handles (wakes the weights first)."""
        with self.lock:
            if self.asleep:
                adapter.wake_up(self.llm, ["weights"])
            loaded = adapter.collective_rpc(self.llm, "clsrl_load_ipc", (handles,))[0]
            if self.asleep:
                adapter.wake_up(self.llm, ["kv_cache"])
                self.asleep = False
            adapter.reset_caches(self.llm)
            self.policy_version = version
        return loaded

    def sleep(self) -> None:
        """Colocated: free the GPU for the learners (weights and KV cache dropped until the next
        load_ipc)."""
        with self.lock:
            if not self.asleep:
                adapter.sleep(self.llm)
                self.asleep = True

    def checksums(self) -> dict[str, str]:
        with self.lock:
            return adapter.collective_rpc(self.llm, "clsrl_checksums")[0]

    def leave_weight_group(self) -> None:
        with self.lock:
            adapter.collective_rpc(self.llm, "clsrl_leave_weight_group")


GPU_MEMORY_UTILIZATION = 0.85
# colocated, the learner rank (weights, gradients, optimizer state, activations) shares the GPU
COLOCATED_GPU_MEMORY_UTILIZATION = 0.4


def engine_options(model_path: str | Path, rollout, dtype: str, seed: int,
                   colocate: bool) -> adapter.LLMOptions:
    """From the `rollout` config section to vLLM's options."""
    share = rollout.gpu_memory_utilization
    if share is None:
        share = COLOCATED_GPU_MEMORY_UTILIZATION if colocate else GPU_MEMORY_UTILIZATION
    return adapter.LLMOptions(
        model=str(model_path), tensor_parallel_size=rollout.tensor_parallel_size,
        dtype={"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[dtype],
        gpu_memory_utilization=share, max_model_len=rollout.max_model_len,
        seed=seed, enforce_eager=rollout.enforce_eager, enable_sleep_mode=colocate, ipc_weights=colocate,
        min_pixels=rollout.min_pixels, max_pixels=rollout.max_pixels)
