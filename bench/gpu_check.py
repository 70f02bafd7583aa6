"""One prepared check for a machine with a GPU: runs what only CUDA can show and writes
docs/gpu-validation.md from what actually ran (`make gpu-check`, under 8 minutes on one GPU).

    python bench/gpu_check.py                      # every check that fits the machine
    python bench/gpu_check.py --only hf_engine,deepspeed --out /tmp/gpu.md

Checks (each is skipped with its reason where the machine lacks what it needs, never faked):
- nccl_broadcast: the weight broadcast (weights/sender.py -> receiver.py) over NCCL between two processes
  on two GPUs, GB/s (needs >= 2 GPUs: NCCL will not put two ranks on one device).
- deepspeed: one ZeRO-2 and one ZeRO-3 bf16 optimizer step of the tiny Qwen2-VL with images (flash-attention
  2 when flash-attn imports, else sdpa).
- hf_engine: the HF engine generating on CUDA in bf16.
- vllm_engine: the vLLM engine with the tiny Qwen2-VL and images, greedy answers against the HF engine's.
- colocated: vLLM sleep (level 2) -> weights through CUDA IPC handles -> wake -> same answers as HF.
On a machine without CUDA it says so and exits 1 without writing the report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHECKS = ("nccl_broadcast", "deepspeed", "hf_engine", "vllm_engine", "colocated")


class Skip(Exception):
    """The machine lacks what the check needs (the reason goes into the report)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--out", default=str(REPO / "docs" / "gpu-validation.md"))
    args = parser.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(args.only) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    return args


# ---- the checks (each returns {metric: value}; raises Skip or fails) ----

def _tiny():
    from tasks.bundled import ensure_bundled
    from tasks.examples import tokenizer_corpus
    from tasks.manifest import read_dataset
    from vlm.tiny import VLLM_CPU_SPEC, ensure_tiny_vlm

    data = read_dataset(ensure_bundled("shapes"))
    return data, ensure_tiny_vlm(VLLM_CPU_SPEC, tokenizer_corpus([data]))


def _requests(processor, data, n: int = 8):
    from protocol.rollout import RolloutRequest
    from tasks.examples import build_examples

    examples, _ = build_examples(processor, data, data.split("test")[:n], "no_think", 56 * 56, 112 * 112, seed=0)
    return [RolloutRequest(e.id, e.inputs, e.solution) for e in examples]


def _nccl_receiver(port: int, size: int) -> None:
    import torch

    from protocol.components import WeightSyncConfig
    from weights.receiver import WeightReceiver

    torch.cuda.set_device(1)
    receiver = WeightReceiver("127.0.0.1", port, 1, 1, WeightSyncConfig(backend="nccl", timeout_s=120))
    for _ in range(3):
        receiver.receive()
    receiver.close()


def check_nccl_broadcast() -> dict:
    import multiprocessing as mp

    import torch

    from protocol.components import WeightSyncConfig
    from weights.sender import WeightSender

    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU(s): NCCL needs one device per rank")
    size = 256 * 2**20 // 2  # 256 MiB of bf16 per version
    named = [(f"w{i}", torch.randn(size // 8, device="cuda:0", dtype=torch.bfloat16)) for i in range(8)]
    sender = WeightSender("127.0.0.1", 0, 1, WeightSyncConfig(backend="nccl", timeout_s=120), connect=False)
    child = mp.get_context("spawn").Process(target=_nccl_receiver, args=(sender.port, size))
    child.start()
    sender.connect()
    rates = []
    for version in range(1, 4):
        rates.append(sender.broadcast(iter(named), version)["mb_per_s"] / 1024)
    sender.close()
    child.join(60)
    return {"GB/s (best of 3, 256 MiB bf16)": round(max(rates), 2), "devices": torch.cuda.get_device_name(0)}


def check_deepspeed() -> dict:
    import deepspeed
    import torch
    from transformers import AutoModelForImageTextToText

    from learner.kernels import adam_params, attention
    from protocol.components import LearnerConfig
    from vlm.inputs import build_sequence_batch
    from vlm.processor import load_processor

    data, model_dir = _tiny()
    attn = attention(LearnerConfig(), cuda=True, bf16=True)  # the learner's own choice: auto
    adam = adam_params(LearnerConfig(), cuda=True)
    processor = load_processor(model_dir)
    prompts = [r.inputs for r in _requests(processor, data, 4)]
    out = {"attention": attn, "adam": "torch AdamW (fused)" if adam["torch_adam"] else "DeepSpeed FusedAdam"}
    for stage in (2, 3):
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                            attn_implementation=attn)
        ds_cfg = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, **adam}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        batch = build_sequence_batch(prompts, [[1, 2, 3]] * 4, 0, model.config.image_token_id,
                                     processor.image_processor)
        kwargs = {k: v.to(engine.device) for k, v in batch.model_kwargs().items()}
        start = time.perf_counter()
        loss = engine(**kwargs).logits.float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        out[f"ZeRO-{stage} step s"] = round(time.perf_counter() - start, 3)
        out[f"ZeRO-{stage} loss"] = round(float(loss), 4)
        engine.destroy()
    return out


def check_hf_engine() -> dict:
    import torch

    from actors.hf_engine import HFEngine
    from protocol.components import SamplingConfig

    data, model_dir = _tiny()
    engine = HFEngine(model_dir, device="cuda", dtype=torch.bfloat16)
    requests = _requests(engine.processor, data)
    sampling = SamplingConfig(n=8, max_new_tokens=32)
    engine.generate(requests, sampling, seed=0)
    start = time.perf_counter()
    groups = engine.generate(requests, sampling, seed=1)
    tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
    return {"completion tokens/s": round(tokens / (time.perf_counter() - start), 1), "prompts": len(requests)}


def _vllm_pair(colocate: bool):
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        raise Skip("vLLM is not installed (pip install 'clsrl[gpu]', matching this machine's torch)")
    from actors.hf_engine import HFEngine
    from actors.vllm_adapter import LLMOptions
    from actors.vllm_engine import VLLMEngine

    data, model_dir = _tiny()
    hf = HFEngine(model_dir, device="cuda", dtype=torch.float32)
    opts = LLMOptions(model=str(model_dir), dtype="float32", gpu_memory_utilization=0.3, max_model_len=512,
                      enforce_eager=True, enable_sleep_mode=colocate, ipc_weights=colocate,
                      min_pixels=56 * 56, max_pixels=112 * 112)
    start = time.perf_counter()
    engine = VLLMEngine(opts)
    return hf, engine, _requests(hf.processor, data), time.perf_counter() - start


def _same_greedy(engine, hf, requests) -> float:
    """Largest log-prob difference; fails if any greedy token differs."""
    from protocol.components import SamplingConfig

    greedy = SamplingConfig(n=1, max_new_tokens=16, greedy=True)
    worst = 0.0
    for a, b in zip(engine.generate(requests, greedy), hf.generate(requests, greedy)):
        (ca,), (cb,) = a.completions, b.completions
        if ca.token_ids != cb.token_ids:
            raise AssertionError(f"greedy tokens differ on {a.request.prompt_id}")
        worst = max([worst] + [abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)])
    return worst


def check_vllm_engine() -> dict:
    from protocol.components import SamplingConfig

    hf, engine, requests, startup = _vllm_pair(colocate=False)
    gap = _same_greedy(engine, hf, requests)
    sampling = SamplingConfig(n=8, max_new_tokens=32)
    engine.generate(requests, sampling, seed=0)
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for g in engine.generate(requests, sampling, seed=1) for c in g.completions)
    return {"start-up s": round(startup, 1), "greedy max |logprob diff| vs HF": f"{gap:.1e}",
            "completion tokens/s": round(tokens / (time.perf_counter() - start), 1)}


def check_colocated() -> dict:
    import torch

    from weights.ipc import share

    hf, engine, requests, _ = _vllm_pair(colocate=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    named = [(n, p.detach() + 0.01 * torch.randn(p.shape, generator=gen, device="cuda"))
             for n, p in hf.model.named_parameters()]
    hf.update_weights(named, 1)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    freed = torch.cuda.mem_get_info()[0] - free_awake
    handles, keep = share(named)
    start = time.perf_counter()
    loaded = engine.load_ipc(handles, 1)
    wake = time.perf_counter() - start
    del keep
    gap = _same_greedy(engine, hf, requests)
    return {"GiB freed by sleep": round(freed / 2**30, 2), "IPC load + wake s": round(wake, 2),
            "tensors loaded": loaded, "greedy max |logprob diff| vs HF": f"{gap:.1e}"}


# ---- the report ----

def machine() -> dict:
    import torch

    info = {"date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), "torch": torch.__version__,
            "CUDA": torch.version.cuda or "none"}
    if torch.cuda.is_available():
        info["GPUs"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    for pkg in ("vllm", "deepspeed", "transformers", "flash_attn"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = "not installed"
    return info


def render(info: dict, results: dict[str, dict]) -> str:
    """The report: the machine, then one row per check with its status and numbers as measured."""
    lines = ["# GPU validation", "", "Written by `make gpu-check` (bench/gpu_check.py) from what ran; do not edit.",
             "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "| check | status | measured |", "|---|---|---|"]
    for name, r in results.items():
        numbers = "; ".join(f"{k}: {v}" for k, v in r.get("values", {}).items()) or r.get("reason", "")
        lines.append(f"| {name} | {r['status']} | {numbers} |")
    return "\n".join(lines) + "\n"


def run_checks(names: list[str]) -> dict[str, dict]:
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            values = globals()[f"check_{name}"]()
            results[name] = {"status": "ok", "values": values}
        except Skip as why:
            results[name] = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # noqa: BLE001 - one failed check must not hide the others' results
            traceback.print_exc()
            results[name] = {"status": "FAILED", "reason": f"{type(err).__name__}: {err}"[:300]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, json.dumps(results[name]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing run, docs/gpu-validation.md not written", file=sys.stderr)
        return 1
    results = run_checks(args.only)
    Path(args.out).write_text(render(machine(), results))
    print(f"wrote {args.out}")
    return 0 if all(r["status"] != "FAILED" for r in results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
