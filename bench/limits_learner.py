"""Learner: samples/s and peak memory per rank against model size and ZeRO stage, 2 DeepSpeed ranks over gloo.

    python bench/limits_learner.py --out runs/bench-limits          # ~10 min idle, half of it xlarge
    python bench/limits_learner.py --quick                          # tiny model, ZeRO 1 and 3, one step
    python bench/limits_learner.py --sizes large --stages 2,3       # a part of the table
    python bench/limits_learner.py --allocator jemalloc             # the ranks on learner.allocator=jemalloc

For every (model size, ZeRO stage): two fresh processes, each a real `learner.worker.LearnerWorker` (DeepSpeed
on CPU, gloo, AdamW with torch_adam, fp32, no KL as in configs/cpu_demo.yaml), train on the same real rollout
groups (the tiny model's `shapes` prompts with G=8 sampled completions; the larger models share its tokenizer,
so the token ids are valid for all). One warm-up step, then timed GRPO steps; samples/s = sequences trained by
both ranks / median step time. Peak memory = the process's max RSS (getrusage), which is why each configuration
gets new processes; "start" is after the learner's libraries (DeepSpeed included) are imported, so peak - start
is what the model and its training add; "model state" is what ZeRO predicts per rank for fp32 Adam: 4 B weights
+ 4 B gradients + 8 B moments per parameter, the moments split over ranks from stage 1, gradients from 2,
weights from 3.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import statistics
import time

import limits_common as lc

QUICK = {"sizes": ["tiny"], "stages": [1, 3], "steps": 1}
FULL = {"sizes": ["tiny", "small", "medium", "large", "xlarge"], "stages": [1, 2, 3], "steps": 2}
MiB = 2**20


def rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MiB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rank_main(rank: int, port: int, model_dir: str, stage: int, blobs: list[bytes], micro: int, steps: int,
              results) -> None:
    """One learner rank: `blobs` are this rank's encoded groups; puts its timings and memory on `results`."""
    import torch

    torch.set_num_threads(1)
    from learner.allocator import loaded_allocator
    from learner.deepspeed_setup import import_deepspeed
    from learner.grpo import group_advantages
    from learner.worker import LearnerWorker
    from protocol.components import GRPOConfig, LearnerConfig
    from stream.codec import decode_group

    import_deepspeed()  # LearnerWorker imports it at construction: a library's memory, not the model's
    rss_start = rss_mib()
    groups = [decode_group(b) for b in blobs]
    # alternate 1/0 rewards: the random tiny model is almost never right, and all-equal rewards give no gradient
    rewards = torch.tensor([float(i % 2) for g in groups for i in range(len(g.completions))])
    adv = group_advantages(rewards, len(groups[0].completions)).view(len(groups), -1)
    samples = sum(len(g.completions) for g in groups)
    cfg = LearnerConfig(zero_stage=stage, micro_batch_size=micro, lr=1e-5)
    t0 = time.perf_counter()
    worker = LearnerWorker(rank, 2, "127.0.0.1", port, model_dir, cfg, GRPOConfig(beta=0.0), samples, steps + 1)
    init_s, rss_init = time.perf_counter() - t0, rss_mib()
    # this rank's copy of the weights: under ZeRO-3 a parameter is an empty placeholder plus its partition (ds_tensor)
    params = sum(getattr(p, "ds_tensor", p).numel() for p in worker.engine.module.parameters())
    step_s = []
    for _ in range(steps + 1):  # the first step builds DeepSpeed's buffers: a warm-up, not counted
        t0 = time.perf_counter()
        stats = worker.train_step([(g, a.tolist()) for g, a in zip(groups, adv)])
        step_s.append(time.perf_counter() - t0)
    results.put({"rank": rank, "samples": samples, "init_s": init_s, "step_s": step_s[1:], "warmup_s": step_s[0],
                 "rss_start_mib": rss_start, "rss_after_init_mib": rss_init, "rss_after_steps_mib": rss_mib(),
                 "peak_rss_mib": peak_rss_mib(), "local_params": params,
                 "allocator": loaded_allocator(),
                 "grad_norm": stats["grad_norm"], "loss_finite": bool(torch.isfinite(torch.tensor(stats["pg_loss"])))})
    worker.close()
    # Skip the interpreter's teardown: a rank process once aborted there ("terminate called without an active
    # exception", ZeRO-3, after close() and after its results were sent); flush the queue and leave.
    results.close()
    results.join_thread()
    os._exit(0)


def collect(results, procs: list, timeout_s: float = 900) -> list[dict]:
    """One report per process; a process that dies before sending its report fails the run at once."""
    import queue

    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < len(procs):
        try:
            out.append(results.get(timeout=2))
        except queue.Empty:  # fewer live processes than missing reports: one died without reporting
            if sum(p.is_alive() for p in procs) < len(procs) - len(out) or time.monotonic() > deadline:
                raise RuntimeError(f"learner ranks failed before reporting: exit codes {[p.exitcode for p in procs]}") from None
    return out


def run_config(model_dir: str, stage: int, shares: list[list[bytes]], micro: int, steps: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from weights.network import listen_port

    port = listen_port("127.0.0.1")
    procs = [ctx.Process(target=rank_main, args=(r, port, model_dir, stage, shares[r], micro, steps, results), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(collect(results, procs), key=lambda x: x["rank"])
    for p in procs:
        p.join(timeout=60)
    for r, p in zip(out, procs):  # a rank that failed before reporting raised above (results.get timed out)
        r["exit_code"] = p.exitcode
        if p.exitcode != 0:
            lc.progress(f"  WARNING: learner rank {r['rank']} exited with {p.exitcode} after reporting (ZeRO {stage})")
    return out


def model_params(model_dir: str) -> int:
    """Parameters in the saved checkpoint (tied embeddings are stored once, as model.parameters() counts them)."""
    from pathlib import Path

    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def predicted_state_mib(params: int, stage: int, ranks: int = 2) -> float:
    """fp32 Adam model state per rank under ZeRO `stage` (weights 4 B, gradients 4 B, moments 8 B per parameter)."""
    weights, grads, moments = 4.0, 4.0, 8.0
    moments /= ranks if stage >= 1 else 1
    grads /= ranks if stage >= 2 else 1
    weights /= ranks if stage >= 3 else 1
    return params * (weights + grads + moments) / MiB


def summarize(size: str, params: int, stage: int, ranks: list[dict]) -> dict:
    step = statistics.median(s for r in ranks for s in r["step_s"])
    samples = sum(r["samples"] for r in ranks)
    return {"size": size, "params": params, "zero_stage": stage, "ranks": len(ranks), "samples_per_step": samples,
            "median_step_s": step, "samples_per_s": samples / step,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
            "rss_start_mib": max(r["rss_start_mib"] for r in ranks),
            "rss_after_init_mib": max(r["rss_after_init_mib"] for r in ranks),
            "rss_after_steps_mib": max(r["rss_after_steps_mib"] for r in ranks),
            "predicted_state_mib": predicted_state_mib(params, stage),
            "local_params": [r["local_params"] for r in ranks], "init_s": max(r["init_s"] for r in ranks),
            "loss_finite": all(r["loss_finite"] for r in ranks), "exit_codes": [r["exit_code"] for r in ranks],
            "grad_norm": ranks[0]["grad_norm"], "allocator": sorted({r["allocator"] for r in ranks}),
            "per_rank": ranks}


def table(results: list[dict]) -> str:
    rows = [[r["size"], f"{r['params'] / 1e6:.1f}M", r["zero_stage"], f"{r['samples_per_s']:.2f}", f"{r['median_step_s']:.2f}",
             f"{r['peak_rss_mib']:,.0f}", f"{r['peak_rss_mib'] - r['rss_start_mib']:,.0f}",
             f"{r['rss_after_steps_mib'] - r['rss_start_mib']:,.0f}", f"{r['predicted_state_mib']:,.0f}",
             f"{r['init_s']:.1f}"] for r in results]
    return lc.md_table(["model", "params", "ZeRO", "samples/s (2 ranks)", "s/step", "peak RSS/rank MiB",
                        "peak - start MiB", "after steps - start MiB", "predicted model state/rank MiB", "init s"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = lc.arg_parser(__doc__)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (2 per step per rank)")
    ap.add_argument("--sizes", help="comma-separated model sizes (default: all of the plan's)")
    ap.add_argument("--stages", help="comma-separated ZeRO stages (default: 1,2,3)")
    ap.add_argument("--allocator", choices=["system", "jemalloc"], default="system",
                    help="the ranks' malloc, as learner.allocator sets it (the spawned ranks inherit LD_PRELOAD)")
    args = ap.parse_args(argv)
    from learner.allocator import allocator_env

    os.environ.update(allocator_env(args.allocator))
    plan = dict(QUICK if args.quick else FULL)
    if args.sizes:
        plan["sizes"] = args.sizes.split(",")
    if args.stages:
        plan["stages"] = [int(s) for s in args.stages.split(",")]
    from stream.codec import encode_group

    lc.progress("learner: sampling real rollout groups from the tiny model")
    blobs = [encode_group(g) for g in lc.make_groups(2)]
    shares = [[blobs[0]], [blobs[1]]]  # one group of G=8 per rank: 8 sequences, micro-batches of --micro-batch
    results = []
    for size in plan["sizes"]:
        model_dir = str(lc.shapes_model(size)[0])
        params = model_params(model_dir)
        for stage in plan["stages"]:
            lc.progress(f"learner: {size} ({params / 1e6:.1f}M params), ZeRO {stage}, {plan['steps']} steps")
            results.append(summarize(size, params, stage, run_config(model_dir, stage, shares, args.micro_batch,
                                                                     plan["steps"])))
            r = results[-1]
            lc.progress(f"  {r['samples_per_s']:.2f} samples/s, peak RSS {r['peak_rss_mib']:,.0f} MiB per rank")
    path = lc.write_report(args.out, "limits_learner", {"quick": args.quick, "ranks": 2, "allocator": args.allocator, "micro_batch": args.micro_batch,
                                                         "steps": plan["steps"], "results": results})
    print("\n" + table(results) + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
