"""clsrl vs TRL's GRPOTrainer on one CPU machine: samples/s, steps/s and reward curves on the same GRPO problem.

    python bench/vs_trl.py                        # tiny and small model, TRL / clsrl sync / clsrl async; ~10 min idle
    python bench/vs_trl.py --quick                # 2 steps per system on a minimal batch (the smoke test)
    python bench/vs_trl.py --models small --steps 10 --out runs/vs-trl-small

Per model, three systems train from the same starting weights (the format-only warm start, run once and shared)
on the same prompts (bundled `shapes`), with the same G, prompts per step, completion length, temperature, lr,
optimizer, KL beta, loss aggregation, advantage scaling and reward terms:
  trl          TRL's GRPOTrainer (bench/trl_side.py): generation and training in one process, HF generate, no vLLM;
  clsrl-sync   cluster.driver.train with rollout.max_staleness=0, 1 rollout worker + 1 learner rank;
  clsrl-async  the same with max_staleness=1 (rollout runs one policy version ahead).
Every system gets the same busy torch threads, 2 (one per core): TRL's process 2 (--trl-threads); clsrl-sync 2 per
actor, as its rollout worker and learner take turns (--sync-threads); clsrl-async 1 per actor, as they run at once
(--async-threads). `--sync-threads 1` is bench/async_vs_sync.py's setting.
Throughput is over the steps after the first --skip (start-up, evaluation and checkpoints excluded and reported
apart). Writes OUT/results.json, OUT/vs_trl.png and one run directory per model and system; prints a markdown table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLSRL_CACHE", str(ROOT / ".cache" / "clsrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.async_vs_sync import LoadSampler, machine  # noqa: E402
from bench.vs_trl_report import TARGETS, plot, table  # noqa: E402

SYSTEMS = ("trl", "clsrl-sync", "clsrl-async")
STALENESS = {"clsrl-sync": 0, "clsrl-async": 1}
# Both systems: overrides on configs/cpu_demo.yaml (cls_equality reward, no_think prompt, beta 0, lr 1e-3, clip 0.2;
# TRL's GRPOTrainer has no dynamic sampling, so the demo's default of it is off here).
COMMON = ["learner.lr=1e-3", "algorithm.clip_high=0.2", "algorithm.dynamic_sampling=false",
          "cluster.rollout_workers=1", "cluster.learner_ranks=1", "sampling.n=8", "sampling.max_new_tokens=8",
          "train.warm_start_steps=0", "train.eval_every=0", "train.save_every=0", "train.loggers=[]",
          "data.eval_limit=96"]
# tiny: vlm/tiny.py's default 0.6M-parameter Qwen2-VL, overhead-bound; small: ~23M, the same build scaled up so
# that compute dominates. Sized so the full run (6 runs, 2 warm starts) takes about 10 minutes on 2 idle cores.
# warm_start: answer-format SFT steps (batch 16) giving the starting checkpoint all three systems share.
MODELS = {
    "tiny": {"spec": [], "steps": 12, "warm_start": 40,
             "batch": ["train.prompts_per_step=96", "rollout.prompts_per_call=96", "learner.micro_batch_size=64"]},
    "small": {"spec": ["model.tiny.hidden_size=512", "model.tiny.intermediate_size=1536", "model.tiny.num_hidden_layers=6",
                       "model.tiny.num_attention_heads=8", "model.tiny.num_key_value_heads=4", "model.tiny.vision_depth=4",
                       "model.tiny.vision_hidden_size=256"],
              "steps": 8, "warm_start": 24, "batch": ["train.prompts_per_step=8", "rollout.prompts_per_call=8",
                                    "learner.micro_batch_size=32", "learner.lr=3.0e-4"]},
}
QUICK = ["train.prompts_per_step=4", "rollout.prompts_per_call=4", "sampling.n=4", "learner.micro_batch_size=16",
         "data.eval_limit=8"]
WARM_START_BATCH, QUICK_WARM_START = 16, 2


def model_overrides(name: str, quick: bool) -> list[str]:
    m = MODELS[name]
    return COMMON + m["spec"] + m["batch"] + (QUICK if quick else [])


def load(overrides: list[str]):
    from commands.cli import DEFAULT_CONFIG
    from protocol.config import ExperimentConfig
    from protocol.overrides import load_config

    return load_config(ExperimentConfig, DEFAULT_CONFIG, overrides)


def shared_start(overrides: list[str], steps: int) -> tuple[str, float, float]:
    """(the starting checkpoint every system loads, seconds it took, millions of parameters). The format-only warm
    start (learner/warm_start.py, as the driver runs it) is cached under $CLSRL_CACHE, keyed by model and settings."""
    from learner.warm_start import format_warm_start
    from tasks.data import load_run_data
    from vlm.cache import default_cache_dir

    t0 = time.perf_counter()
    cfg = load(overrides)
    data = load_run_data(cfg)
    key = hashlib.sha256(json.dumps([data.model_path, steps, WARM_START_BATCH, cfg.train.warm_start_lr,
                                     cfg.train.seed]).encode()).hexdigest()[:12]
    path = format_warm_start(data.model_path, default_cache_dir() / "bench" / f"warm-{Path(data.model_path).name}-{key}",
                             data.train_examples, {n: t.prompt for n, t in data.tasks.items()}, steps,
                             cfg.train.warm_start_lr, WARM_START_BATCH, cfg.train.seed)
    return str(path), time.perf_counter() - t0, _param_count(path) / 1e6


def _param_count(model_dir: str | Path) -> int:
    """Parameters stored in the checkpoint (tied embeddings counted once), read from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def throughput(step_s: list[float], samples_per_step: int, skip: int) -> dict:
    """Steady state: the steps after the first `skip` (a 1-step run still reports its one step)."""
    measured = step_s[skip:] or step_s[-1:]
    seconds = sum(measured)
    return {"steps": len(step_s), "measured_steps": len(measured), "measured_seconds": seconds,
            "samples": len(step_s) * samples_per_step, "samples_per_s": len(measured) * samples_per_step / seconds,
            "steps_per_s": len(measured) / seconds, "median_step_s": statistics.median(measured),
            "first_steps_s": sum(step_s[:len(step_s) - len(measured)])}


def run_trl(overrides: list[str], steps: int, threads: int, out: Path, skip: int) -> dict:
    """TRL in its own process (bench/trl_side.py), so its thread count and memory are its own."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"overrides": overrides, "steps": steps, "threads": threads, "out_dir": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with open(out / "trl.log", "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "trl_side.py"), str(spec)], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"TRL run failed (exit {proc.returncode}); see {out / 'trl.log'}:\n"
                           + (out / "trl.log").read_text()[-3000:])
    r = json.loads((out / "trl.json").read_text())
    n = r["samples_per_step"]
    t = throughput(r["step_seconds"], n, skip)
    measured = r["generate_seconds"][len(r["step_seconds"]) - t["measured_steps"]:]
    gen = statistics.fmean(measured)
    return {**t, "samples_counted": sum(r["samples_scored"]), "threads": r["threads"],
            "step_s": r["step_seconds"], "generate_s_per_step": gen, "train_s_per_step": t["measured_seconds"]
            / t["measured_steps"] - gen, "startup_s": r["startup_s"],
            "reward": [((i + 1) * n, v) for i, v in enumerate(r["rewards"])],
            "grpo_start_accuracy": r["grpo_start_accuracy"], "final_accuracy": r["final_accuracy"], "run_dir": str(out)}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_clsrl(overrides: list[str], staleness: int, out: Path, skip: int) -> dict:
    """cluster.driver.train, the same code path as `clsrl train` (Ray started once by main, so not counted here)."""
    import shutil

    from cluster.driver import train

    cfg = load(overrides + [f"rollout.max_staleness={staleness}"])
    if out.exists():
        shutil.rmtree(out)
    result = train(cfg, out)
    rows = _rows(out / "metrics.jsonl")
    steps = [r for r in rows if r["step"] >= 1]
    n = cfg.train.prompts_per_step * cfg.sampling.n
    t = throughput([r["time/step"] for r in steps], n, skip)
    measured = steps[len(steps) - t["measured_steps"]:]
    evals = sum(r.get("time/eval", 0.0) for r in rows)
    trained = _rows(out / "trained.jsonl")  # the driver's exactly-once audit: prompt ids trained per step
    return {**t, "samples_counted": sum(len(r["prompt_ids"]) for r in trained) * cfg.sampling.n,
            "step_s": [r["time/step"] for r in steps],
            "generate_s_per_step": statistics.fmean(r.get("time/generate", 0.0) for r in measured),
            "train_s_per_step": statistics.fmean(r["time/train_step"] for r in measured),
            "startup_s": result["seconds"] - sum(r["time/step"] for r in steps) - evals,
            "reward": [(r["step"] * n, r["reward/mean"]) for r in steps if "reward/mean" in r],
            "grpo_start_accuracy": result["grpo_start"], "final_accuracy": result["final"],
            "staleness": result["staleness"], "run_dir": str(out)}


def compare(systems: dict[str, dict], name: str) -> dict:
    """clsrl / TRL samples/s per clsrl mode, and which of the issue's targets they meet."""
    trl = systems["trl"]["samples_per_s"]
    ratios = {s: systems[s]["samples_per_s"] / trl for s in systems if s != "trl"}
    targets = {s: {"target": goal, "ratio": ratios[s], "met": ratios[s] >= goal}
               for (model, s), goal in TARGETS.items() if model == name and s in ratios}
    return {"ratio_vs_trl": ratios, "targets": targets}


def prepare(models: list[str], steps: int | None, quick: bool) -> dict:
    """Per model: the overrides every system runs with, after the shared starting checkpoint is made."""
    plan = {}
    for name in models:
        n_steps = 2 if quick else (steps or MODELS[name]["steps"])
        base = model_overrides(name, quick)
        print(f"== {name}: starting weights (format warm start, shared)", flush=True)
        path, warm_s, params_m = shared_start(base, QUICK_WARM_START if quick else MODELS[name]["warm_start"])
        cfg = load(base)
        plan[name] = {"overrides": base + [f"model.path={path}", f"train.steps={n_steps}"], "steps": n_steps,
                      "params_m": round(params_m, 2), "warm_start_s": warm_s, "start_checkpoint": path,
                      "samples_per_step": cfg.train.prompts_per_step * cfg.sampling.n, "systems": {}}
    return plan


def run_clsrl_all(plan: dict, system: str, threads: int, out: Path, skip: int, extra: list[str]) -> float:
    """One clsrl mode on every model, under a local Ray whose actors run `threads` torch threads each (the actors
    read OMP_NUM_THREADS); returns Ray's start-up seconds (not in any run's numbers). `extra`: overrides for
    clsrl's runs only (--clsrl-set)."""
    import ray

    from cluster.job import local_runtime_env
    from cluster.placement import init_ray

    env = local_runtime_env()
    env["env_vars"]["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    init_ray(load(next(iter(plan.values()))["overrides"]).cluster, env)
    ray_s = time.perf_counter() - t0
    try:
        for name, p in plan.items():
            print(f"== {name} / {system}: {p['steps']} steps x {p['samples_per_step']} samples, {threads} thread(s) "
                  f"per actor", flush=True)
            load_avg = LoadSampler()
            p["systems"][system] = {**run_clsrl(p["overrides"] + extra, STALENESS[system], out / name / system, skip),
                                    "threads": threads, "loadavg_1m": load_avg.stop()}
    finally:
        ray.shutdown()
    return ray_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps per system (default: per model, 12 / 8)")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the throughput (warm-up)")
    ap.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL process")
    ap.add_argument("--sync-threads", type=int, default=2,
                    help="torch threads per clsrl-sync actor (rollout worker and learner take turns: 2 busy at a time)")
    ap.add_argument("--async-threads", type=int, default=1,
                    help="torch threads per clsrl-async actor (rollout worker and learner run at once: 2 busy)")
    ap.add_argument("--quick", action="store_true", help="2 steps per system on a minimal batch (smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-vs-trl")
    ap.add_argument("--clsrl-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for clsrl's runs only, e.g. learner.zero_stage=0 (TRL's side unchanged)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
    if min(args.trl_threads, args.sync_threads, args.async_threads) < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--steps and the thread counts must be >= 1")
    skip = 1 if args.quick else args.skip
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    before = machine(probe=not args.quick)
    plan = prepare(models, args.steps, args.quick)  # every starting checkpoint first: no system pays for it
    for name, p in plan.items():  # TRL before Ray exists: no idle Ray processes beside it
        print(f"== {name} / trl: {p['steps']} steps x {p['samples_per_step']} samples, {args.trl_threads} threads",
              flush=True)
        load_avg = LoadSampler()
        p["systems"]["trl"] = {**run_trl(p["overrides"], p["steps"], args.trl_threads, args.out / name / "trl", skip),
                               "loadavg_1m": load_avg.stop()}
    ray_init_s = {system: run_clsrl_all(plan, system, threads, args.out, skip, args.clsrl_set)
                  for system, threads in (("clsrl-sync", args.sync_threads), ("clsrl-async", args.async_threads))}
    for name, p in plan.items():
        p.update(compare(p["systems"], name))
    report = {"machine": before, "loadavg_after": [round(x, 2) for x in os.getloadavg()], "quick": args.quick,
              "clsrl_overrides": args.clsrl_set,
              "skip": skip, "threads": {"trl": args.trl_threads, "clsrl-sync": args.sync_threads,
                                        "clsrl-async": args.async_threads},
              "ray_init_s": ray_init_s, "wall_s": time.time() - t0, "models": plan}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "vs_trl.png")
    print(f"\nmachine: {before['cpus']} CPUs, torch {before['torch']}, load average {before['loadavg']} before, "
          f"{report['loadavg_after']} after, overlap capacity {before['overlap_capacity']} (2.0 = two free cores); "
          f"throughput over steps {skip + 1}..; torch threads: TRL {args.trl_threads}, clsrl-sync "
          f"{args.sync_threads} per actor, clsrl-async {args.async_threads} per actor\n")
    print(table(report))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'vs_trl.png'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
