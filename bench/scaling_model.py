"""Scaling model: GRPO steps/hour against the number of rollout engines, synchronous and asynchronous.

    python bench/scaling_model.py --results runs/bench-limits --out runs/bench-limits   # a few seconds
    python bench/scaling_model.py --quick

A discrete-event simulation of clsrl's driver loop (cluster/driver.py), step by step:
  * admission (cluster/staleness.py): while the learner holds version v, at most (v + k + 1) x B prompts may have
    been issued; k = rollout.max_staleness, 0 is the synchronous loop;
  * every idle engine gets a chunk of rollout.prompts_per_call = ceil(B / engines) prompts (one wave per step
    when synchronous), which takes its generation time plus the per-call overhead (Ray call, reward actor) plus
    publishing its groups to Redis;
  * the learner starts when B groups are in the stream, reads them and trains; the engines keep generating
    while the budget allows;
  * then the broadcast: it waits for every chunk in flight (an engine's receive_weights queues behind its
    rollout call) and takes the broadcast time; no chunk is issued meanwhile.
Redis is one single-threaded server: a step can be no shorter than the time it spends writing and reading
that step's groups at the measured rates (the steps/hour below take that floor).

Two scenarios. "cpu-tiny": this machine and the tiny model, every stage time measured by the bench/limits_*.py
runs (read from their JSON in --results; the defaults below, measured the same way under load, stand in when a
file is missing). "gpu-2b": a Qwen2-VL-2B-sized policy on H100s, stage times from published hardware figures
and the assumptions in GPU (each says whether it is a datasheet figure or an assumption), with clsrl's own
overheads (per-call cost, Redis MiB/s, broadcast efficiency) taken from the measurements.
Writes OUT/scaling_model.json and OUT/scaling_model.png; prints a markdown table.
"""
from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import limits_common as lc

MiB = 2**20
ENGINES = [1, 2, 4, 8, 16, 32, 64]
STALENESS = [0, 1, 2, 4]
PARTIAL = [1, 2]  # also simulated with rollout.partial_rollout (no broadcast barrier)

# Measured by bench/limits_*.py on the 2-core VM under load (2026-11-21); used only when a results file is missing.
MEASURED_DEFAULTS = {
    "gen_s_per_sample": 0.0026,  # limits_rollout "demo": engine.generate seconds / (prompts x G), tiny model
    "call_overhead_s": 0.016,  # limits_rollout: reward actor + Ray call, per rollout call
    "chunk_cv": 0.25,  # limits_rollout: spread (std/mean) of the per-call time
    "train_s_per_sample": 0.0100,  # limits_learner: tiny model, ZeRO-2, 2 ranks, 1 / samples/s
    "sync_s_k1": 0.006, "sync_s_k2": 0.010,  # limits_weights: tiny model broadcast to K=1, 2 engines
    "group_bytes": 171_000,  # limits_buffer: one encoded group (G=8) of the tiny model's prompts
    "write_bytes_per_s": 380 * MiB, "read_bytes_per_s": 450 * MiB,  # limits_buffer: put_many / take + ack
    "broadcast_ratio": 0.3,  # limits_weights: clsrl / plain gloo, largest model, default buckets (reported only)
    "broadcast_protocol_s": 0.004,  # limits_weights: clsrl - plain seconds on the tiny model (headers, acks, polling)
}

# The GPU scenario. Datasheet figures: NVIDIA H100 SXM5 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100):
# BF16 Tensor Core 1,979 TFLOPS *with sparsity*, so 989.4 dense; HBM3 3.35 TB/s; NVLink 900 GB/s. InfiniBand NDR
# (NVIDIA ConnectX-7): 400 Gb/s = 50 GB/s per port. Model shape: Qwen2-VL-2B-Instruct's config.json (Hugging Face).
GPU = {
    "bf16_flops": 989.4e12,  # datasheet, dense
    "hbm_bytes_per_s": 3.35e12,  # datasheet
    "ib_bytes_per_s": 50e9,  # datasheet (NDR 400 Gb/s): learner node -> engines on other nodes
    "params": 2.2e9,  # Qwen2-VL-2B: ~2.2B parameters, bf16 weights = 4.4 GB
    "kv_bytes_per_token": 2 * 28 * 2 * 128 * 2,  # K and V x 28 layers x 2 KV heads x head_dim 128 x bf16
    "prompt_tokens": 350,  # assumption: a 448x448 image = 256 visual tokens, plus ~94 text tokens
    "pixel_bytes_per_group": 1024 * 1176 * 4,  # 448x448 -> 1024 patches x 1176 values, float32 (what the codec ships)
    "completion_mean": 256, "completion_sigma": 0.6, "completion_max": 1024,  # assumption: lognormal think+answer
    "prompts_per_step": 128, "group_size": 8,  # assumption: B=128 prompts x G=8 = 1024 samples per step
    "learner_gpus": 8,  # assumption: one 8-GPU node of learners (ZeRO data parallel)
    "kl": True,  # the papers' GRPO: a reference forward per sample
    "mfu_train": 0.35, "mfu_prefill": 0.5, "mfu_decode": 0.5,  # assumptions: achieved fraction of dense bf16 peak
    "hbm_efficiency": 0.6,  # assumption: achieved fraction of HBM bandwidth while decoding
    "max_num_seqs": 256,  # assumption: the engine's concurrent-sequence cap (vLLM's default max_num_seqs)
    "link_efficiency": 0.8,  # assumption: NCCL broadcast reaches ~80% of the link (busbw = algbw for broadcast)
}


@dataclass
class Scenario:
    name: str
    prompts_per_step: int  # B
    group_size: int  # G
    train_s: float  # one optimizer step on B x G samples, all learner ranks together (reading the stream excluded)
    chunk_s: Callable[[int, random.Random], float]  # generating n prompts x G on one engine
    call_overhead_s: float  # per rollout call: Ray call, reward actor
    group_bytes: float
    write_bytes_per_s: float
    read_bytes_per_s: float
    sync_s: Callable[[int], float]  # broadcast to K engines


def simulate(sc: Scenario, engines: int, k: int, steps: int = 40, warmup: int = 8, seed: int = 0,
             partial: bool = False) -> float:
    """Mean seconds per step after `warmup` steps of the driver loop described in the module docstring.

    partial: rollout.partial_rollout, where receive_weights runs beside the rollout call (a threaded actor), so the
    broadcast does not wait for the chunks in flight (their short pause for the copy is not modelled)."""
    rng, b = random.Random(seed), sc.prompts_per_step
    chunk = math.ceil(b / engines)
    publish_s = sc.group_bytes / sc.write_bytes_per_s
    started, ready, t = 0, 0, 0.0
    idle, inflight, ends = list(range(engines)), [], []

    def fill(now: float, version: int) -> None:
        nonlocal started
        while idle:
            n = min(chunk, (version + k + 1) * b - started)
            if n <= 0:
                return
            started += n
            heapq.heappush(inflight, (now + sc.chunk_s(n, rng) + sc.call_overhead_s + n * publish_s, idle.pop(), n))

    def finish() -> float:
        nonlocal ready
        done, engine, n = heapq.heappop(inflight)
        ready += n
        idle.append(engine)
        return done

    for step in range(steps):
        fill(t, step)
        while ready < b:  # the learner waits for a full batch in the stream
            t = max(t, finish())
            fill(t, step)
        train_end = t + b * sc.group_bytes / sc.read_bytes_per_s + sc.train_s
        while inflight and inflight[0][0] <= train_end:  # engines refill while the learner trains
            fill(finish(), step)
        ready -= b
        t = train_end
        while inflight and not partial:  # the broadcast waits for the chunks in flight
            t = max(t, finish())
        t += sc.sync_s(engines)
        ends.append(t)
    return (ends[-1] - ends[warmup - 1]) / (steps - warmup)


def steps_per_hour(sc: Scenario, engines: int, k: int, seeds: int = 3, steps: int = 40, partial: bool = False) -> dict:
    step_s = statistics.fmean(simulate(sc, engines, k, steps, min(8, steps // 4), seed, partial) for seed in range(seeds))
    redis_s = sc.prompts_per_step * sc.group_bytes * (1 / sc.write_bytes_per_s + 1 / sc.read_bytes_per_s)
    return {"step_s": step_s, "redis_floor_s": redis_s, "steps_per_hour": 3600 / max(step_s, redis_s),
            "redis_bound": redis_s > step_s}


def bound(sc: Scenario, engines: int, samples: int = 200) -> float:
    """Steps/hour with generation and training fully overlapped and no broadcast barrier: 3600 / max(stages)."""
    rng, chunk = random.Random(1), math.ceil(sc.prompts_per_step / engines)
    waves = math.ceil(sc.prompts_per_step / (chunk * engines))
    publish = chunk * sc.group_bytes / sc.write_bytes_per_s
    gen = waves * (statistics.fmean(sc.chunk_s(chunk, rng) for _ in range(samples)) + sc.call_overhead_s + publish)
    learn = sc.train_s + sc.prompts_per_step * sc.group_bytes / sc.read_bytes_per_s
    return 3600 / max(gen, learn + sc.sync_s(engines))


# ---------------------------------------------------------------------------------------------- calibration


def calibration(results: Path) -> tuple[dict, dict]:
    """(values, where each came from): the limits_*.json in `results`, else MEASURED_DEFAULTS."""
    cal, src = dict(MEASURED_DEFAULTS), dict.fromkeys(MEASURED_DEFAULTS, "default (earlier run, under load)")

    def take(key: str, value: float, where: str) -> None:
        cal[key], src[key] = value, where

    if rollout := lc.load_report(results, "limits_rollout"):
        c = rollout["configs"][0]
        per_call = c["prompts_per_call"] * c["n"]
        take("gen_s_per_sample", c["median_s"]["generate_s"] / per_call, "limits_rollout.json")
        take("call_overhead_s", c["median_s"]["reward_s"] + c["median_s"]["call_overhead_s"], "limits_rollout.json")
        calls = [r["actor_s"] for r in c["iterations_raw"]]
        if len(calls) > 1:
            take("chunk_cv", statistics.pstdev(calls) / statistics.fmean(calls), "limits_rollout.json")
    if learner := lc.load_report(results, "limits_learner"):
        tiny = [r for r in learner["results"] if r["size"] == "tiny"]
        pick = min(tiny, key=lambda r: abs(r["zero_stage"] - 2))  # the default stage (configs/cpu_demo.yaml)
        take("train_s_per_sample", 1 / pick["samples_per_s"], f"limits_learner.json (ZeRO {pick['zero_stage']})")
    if weights := lc.load_report(results, "limits_weights"):
        rows = weights["results"]
        for r in rows:
            if r["model"] == "tiny" and r["bucket_mb"] == 64:
                take(f"sync_s_k{r['k']}", r["median_s"]["clsrl"], "limits_weights.json")
                if r["k"] == 1:
                    take("broadcast_protocol_s", max(0.0, r["median_s"]["clsrl"] - r["median_s"]["plain"]),
                         "limits_weights.json")
        biggest = max(r["bytes"] for r in rows)
        default = [r["ratio"] for r in rows if r["bytes"] == biggest and r["bucket_mb"] == 64]
        take("broadcast_ratio", min(default), "limits_weights.json")
    if buffer := lc.load_report(results, "limits_buffer"):
        take("group_bytes", buffer["group_bytes"], "limits_buffer.json")
        take("write_bytes_per_s", buffer["write"]["clsrl_mib_per_s"] * MiB, "limits_buffer.json")
        take("read_bytes_per_s", buffer["read"]["clsrl_mib_per_s"] * MiB, "limits_buffer.json")
    return cal, src


def cpu_scenario(cal: dict) -> Scenario:
    """The tiny model on CPU engines (one thread each), the configs/cpu_demo.yaml step of 16 prompts x 8."""
    b, g = 16, 8
    sigma = math.sqrt(math.log(1 + cal["chunk_cv"] ** 2))

    def chunk_s(n: int, rng: random.Random) -> float:
        return n * g * cal["gen_s_per_sample"] * rng.lognormvariate(-sigma ** 2 / 2, sigma)  # mean 1

    per_engine = cal["sync_s_k2"] - cal["sync_s_k1"]  # gloo from one root: measured growth from K=1 to K=2, linear
    return Scenario("cpu-tiny", b, g, b * g * cal["train_s_per_sample"], chunk_s, cal["call_overhead_s"],
                    cal["group_bytes"], cal["write_bytes_per_s"], cal["read_bytes_per_s"],
                    lambda k: cal["sync_s_k1"] + max(0.0, per_engine) * (k - 1))


def decode_step_s(batch: int, context: float) -> float:
    """One decode step of `batch` sequences: weights and KV cache read from HBM, or the matmuls, whichever is slower."""
    memory = (GPU["params"] * 2 + batch * context * GPU["kv_bytes_per_token"]) / (GPU["hbm_bytes_per_s"] * GPU["hbm_efficiency"])
    compute = 2 * GPU["params"] * batch / (GPU["bf16_flops"] * GPU["mfu_decode"])
    return max(memory, compute)


def gpu_chunk_s(n: int, rng: random.Random) -> float:
    """n prompts x G on one H100: prefill, then decode until the longest completion ends (waves beyond max_num_seqs)."""
    g, mu = GPU["group_size"], math.log(GPU["completion_mean"]) - GPU["completion_sigma"] ** 2 / 2
    lengths = [min(GPU["completion_max"], rng.lognormvariate(mu, GPU["completion_sigma"])) for _ in range(n * g)]
    prefill = 2 * GPU["params"] * n * g * GPU["prompt_tokens"] / (GPU["bf16_flops"] * GPU["mfu_prefill"])
    batch = min(len(lengths), GPU["max_num_seqs"])
    context = GPU["prompt_tokens"] + statistics.fmean(lengths) / 2
    waves = math.ceil(len(lengths) / batch)
    return prefill + max(max(lengths), waves * statistics.fmean(lengths)) * decode_step_s(batch, context)


def gpu_scenario(cal: dict) -> Scenario:
    b, g = GPU["prompts_per_step"], GPU["group_size"]
    tokens = GPU["prompt_tokens"] + GPU["completion_mean"]
    flops = (6 + (2 if GPU["kl"] else 0)) * GPU["params"] * tokens * b * g  # forward+backward, plus the reference forward
    train_s = flops / (GPU["learner_gpus"] * GPU["bf16_flops"] * GPU["mfu_train"])
    nbytes = GPU["params"] * 2
    link = nbytes / (GPU["ib_bytes_per_s"] * GPU["link_efficiency"])  # NCCL broadcast: independent of K
    # The CPU ratio does not carry over: its gap is page faults and memcpy as slow as loopback (limits_weights), while
    # on GPUs packing and the engines' copy-in run at HBM speed; the protocol's fixed cost (headers, acks) does.
    sync = link + 2 * 2 * nbytes / GPU["hbm_bytes_per_s"] + cal["broadcast_protocol_s"]
    group_bytes = GPU["pixel_bytes_per_group"] + g * GPU["completion_mean"] * 12  # + ids and log-probs per token
    return Scenario("gpu-2b", b, g, train_s, gpu_chunk_s, cal["call_overhead_s"], group_bytes,
                    cal["write_bytes_per_s"], cal["read_bytes_per_s"], lambda k: sync)


# ---------------------------------------------------------------------------------------------- report


def run(cal: dict, engines: list[int], staleness: list[int], steps: int, seeds: int) -> list[dict]:
    out = []
    for sc in (cpu_scenario(cal), gpu_scenario(cal)):
        curves = {str(k): [steps_per_hour(sc, n, k, seeds, steps) for n in engines] for k in staleness}
        partial = {str(k): [steps_per_hour(sc, n, k, seeds, steps, partial=True) for n in engines] for k in PARTIAL}
        out.append({"scenario": sc.name, "engines": engines, "prompts_per_step": sc.prompts_per_step,
                    "group_size": sc.group_size, "train_s": sc.train_s, "sync_s_k1": sc.sync_s(1),
                    "group_bytes": sc.group_bytes, "curves": curves, "partial_rollout": partial,
                    "bound": [bound(sc, n) for n in engines]})
    return out


def plot(scenarios: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, s in enumerate(scenarios):
        ax = fig.add_subplot(1, len(scenarios), i + 1)
        for j, (k, curve) in enumerate(s["curves"].items()):  # thinner each: coinciding curves stay visible
            ax.plot(s["engines"], [c["steps_per_hour"] for c in curve], marker="o", markersize=3, linewidth=3.5 - 0.8 * j,
                    label="synchronous (k=0)" if k == "0" else f"asynchronous, max_staleness {k}")
        for k, curve in s["partial_rollout"].items():
            ax.plot(s["engines"], [c["steps_per_hour"] for c in curve], linestyle=":", marker="x", markersize=3,
                    label=f"asynchronous, max_staleness {k}, partial rollout")
        ax.plot(s["engines"], s["bound"], linestyle="--", color="grey", label="overlap bound, no broadcast barrier")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{s['scenario']}: {s['prompts_per_step']} prompts x {s['group_size']} per step", fontsize=10)
        ax.set_xlabel("rollout engines", fontsize=9)
        ax.set_ylabel("GRPO steps / hour", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.savefig(path, format="png", dpi=90)


def table(s: dict) -> str:
    rows = []
    for j, n in enumerate(s["engines"]):
        cells = [f"{s['curves'][k][j]['steps_per_hour']:,.0f}" + ("*" if s["curves"][k][j]["redis_bound"] else "")
                 for k in s["curves"]]
        cells += [f"{s['partial_rollout'][k][j]['steps_per_hour']:,.0f}" for k in s["partial_rollout"]]
        rows.append([n, *cells, f"{s['bound'][j]:,.0f}"])
    heads = [f"k={k}" + (" (sync)" if k == "0" else "") for k in s["curves"]]
    heads += [f"k={k} partial" for k in s["partial_rollout"]]
    return lc.md_table(["engines", *heads, "bound"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = lc.arg_parser(__doc__)
    ap.add_argument("--results", type=Path, default=None, help="folder with the limits_*.json (default: --out)")
    args = ap.parse_args(argv)
    cal, src = calibration(args.results or args.out)
    engines, steps, seeds = ([1, 4, 16, 64], 16, 1) if args.quick else (ENGINES, 40, 3)
    scenarios = run(cal, engines, STALENESS, steps, seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(scenarios, args.out / "scaling_model.png")
    path = lc.write_report(args.out, "scaling_model", {"quick": args.quick, "calibration": cal, "calibration_source": src,
                                                        "gpu": GPU, "scenarios": scenarios})
    for s in scenarios:
        print(f"\n{s['scenario']}: train {s['train_s']:.2f} s/step, broadcast {s['sync_s_k1']:.3f} s, group "
              f"{s['group_bytes'] / 1e3:.0f} kB (* = Redis-bound)\n\n" + table(s))
    print(f"\nwrote {path} and {args.out / 'scaling_model.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
