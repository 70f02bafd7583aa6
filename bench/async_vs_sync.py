"""Asynchronous vs synchronous rollout on one CPU machine: throughput, accuracy after the same samples, staleness.

    python bench/async_vs_sync.py                     # sync, max_staleness 1 and 2, 1 with TIS; ~6 min idle
    python bench/async_vs_sync.py --quick             # 2 steps per mode (the smoke test)
    python bench/async_vs_sync.py --steps 20 --modes 0,1 --set sampling.max_new_tokens=16

Every mode is the same code path (cluster.driver.train) from the same seed and the same warm-start weights;
only `rollout.max_staleness` differs (0 = synchronous), and `algorithm.off_policy` in a `K:tis` mode.
One rollout worker and one learner rank, each on one thread, so synchronous costs generate + train per step
and asynchronous about max(generate, train).
Throughput comes from the driver's per-step timings (time/step) after the first `--skip` steps, so the Ray /
DeepSpeed startup, the warm start, evaluation and the final checkpoint are excluded (and reported separately).
Writes OUT/results.json, OUT/async_vs_sync.png and one run directory per mode; prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLSRL_CACHE", str(ROOT / ".cache" / "clsrl"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from telemetry.tables import md_table  # noqa: E402

# Overrides on configs/cpu_demo.yaml: sized so generation and training each take over a second per step here.
BASE = [
    "cluster.rollout_workers=1", "cluster.learner_ranks=1",
    "train.prompts_per_step=96", "rollout.prompts_per_call=96", "sampling.n=8", "sampling.max_new_tokens=8",
    "learner.micro_batch_size=64", "train.warm_start_steps=40", "train.eval_every=5", "train.save_every=0",
    "train.loggers=[]", "data.eval_limit=96",
    "algorithm.dynamic_sampling=false",  # the same work each step in every mode (no redraws)
]
QUICK = ["train.warm_start_steps=2", "train.eval_every=0", "data.eval_limit=8", "train.prompts_per_step=4",
         "rollout.prompts_per_call=4", "sampling.n=4", "learner.micro_batch_size=16"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return statistics.fmean(vals) if vals else None


def summarize(name: str, staleness: int, rows: list[dict], result: dict, samples_per_step: int, skip: int) -> dict:
    """Steady-state throughput from the step timings, plus what the run reached."""
    steps = [r for r in rows if r["step"] >= 1]
    measured = [r for r in steps if r["step"] > skip] or steps[-1:]  # a 1-step quick run still reports something
    seconds = sum(r["time/step"] for r in measured)
    evals = [r for r in rows if "eval/accuracy" in r]
    return {
        "mode": name, "max_staleness": staleness, "steps": len(steps), "measured_steps": len(measured),
        "samples": len(steps) * samples_per_step, "measured_seconds": seconds,
        "samples_per_s": len(measured) * samples_per_step / seconds, "steps_per_hour": 3600 * len(measured) / seconds,
        "median_step_s": statistics.median(r["time/step"] for r in measured),  # robust to spikes of a shared machine
        "step_s": {k: _mean(measured, f"time/{k}") for k in ("step", "generate", "reward", "publish", "train_step",
                                                             "take", "train_wait", "sync")},
        "end_to_end_samples_per_s": len(steps) * samples_per_step / result["seconds"],  # start-up and evals included
        "excluded_s": result["seconds"] - seconds,  # everything not in the throughput: the next three and the first steps
        "first_steps_s": sum(r["time/step"] for r in steps if r not in measured),
        "eval_s": sum(r.get("time/eval", 0.0) for r in rows),
        "setup_teardown_s": result["seconds"] - sum(r["time/step"] for r in steps) - sum(r.get("time/eval", 0.0) for r in rows),
        # busy fractions of the measured wall time: what overlapping can win back
        "learner_busy": sum(r.get("time/train_step", 0.0) for r in measured) / seconds,
        "engine_busy": sum(r.get("time/generate", 0.0) for r in measured) / seconds,
        "grpo_start_accuracy": result["grpo_start"], "final_accuracy": result["final"],
        "eval_accuracy": [(r["step"] * samples_per_step, r["eval/accuracy"]) for r in evals],
        "reward": [(r["step"] * samples_per_step, r["reward/mean"]) for r in steps if "reward/mean" in r],
        "staleness": {int(k): v for k, v in result["staleness"].items()},
        "staleness_mean": _mean(steps, "staleness/mean"), "dropped_stale": sum(r.get("dropped/stale", 0) for r in steps),
        "run_dir": result["run_dir"],
    }


def parse_modes(text: str) -> list[tuple[str, int, list[str]]]:
    """Parse e.g. `0,1,2,1:tis` into (name, max_staleness, extra overrides); `:tis` adds algorithm.off_policy=tis."""
    modes = []
    for item in text.split(","):
        k, _, loss = item.strip().partition(":")
        if not k.isdigit() or loss not in ("", "ppo", "tis"):
            raise ValueError(f"--modes entry {item!r}: expected K or K:ppo or K:tis with K = max_staleness >= 0")
        name = ("sync" if int(k) == 0 else f"async-{k}") + (f"-{loss}" if loss else "")
        modes.append((name, int(k), [f"algorithm.off_policy={loss}"] if loss else []))
    if len({m[0] for m in modes}) != len(modes):
        raise ValueError(f"--modes {text!r} names a mode twice")
    return modes


def run_mode(staleness: int, overrides: list[str], run_dir: Path, warm_start: Path | None) -> tuple[list[dict], dict, Path]:
    from cluster.driver import train
    from commands.cli import DEFAULT_CONFIG
    from protocol.config import ExperimentConfig
    from protocol.overrides import load_config

    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, overrides + [f"rollout.max_staleness={staleness}"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if warm_start is not None:  # the same starting weights in every mode, trained once
        shutil.copytree(warm_start, run_dir / "warm_start")
    result = train(cfg, run_dir)
    return _rows(run_dir), result, run_dir / "warm_start"


def table(results: list[dict]) -> str:
    sync = next((r for r in results if r["mode"] == "sync"), results[0])
    header = ["mode", "max_staleness", "samples/s", "steps/hour", "vs sync", "s/step (median)", "generate s/step",
              "train s/step", "sync s/step", "acc start -> end", "staleness histogram", "load (1 min avg)"]
    rows = []
    for r in results:
        t = r["step_s"]
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(r["staleness"].items()))
        rows.append([r["mode"], r["max_staleness"], f"{r['samples_per_s']:.1f}", f"{r['steps_per_hour']:.0f}",
                     f"{r['samples_per_s'] / sync['samples_per_s']:.2f}x",
                     f"{t['step']:.2f} ({r['median_step_s']:.2f})", _fmt(t["generate"]), _fmt(t["train_step"]),
                     _fmt(t["sync"]), f"{r['grpo_start_accuracy']:.3f} -> {r['final_accuracy']:.3f}", hist,
                     f"{r['loadavg_1m']['mean']:.1f}"])
    return md_table(header, rows, "lrrrrrrrrllr")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def plot(results: list[dict], out_png: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_r, ax_a, ax_t, ax_s = (fig.add_subplot(1, 4, i) for i in (1, 2, 3, 4))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        if r["reward"]:
            xs, ys = zip(*r["reward"])
            ax_r.plot(xs, ys, label=r["mode"], linewidth=1.2)
        xs, ys = zip(*r["eval_accuracy"])
        ax_a.plot(xs, ys, marker="o", markersize=4, label=r["mode"])
        rows = _rows(Path(r["run_dir"]))
        steps = [x["step"] for x in rows if x["step"] >= 1]
        ax_t.plot(steps, [x["time/step"] for x in rows if x["step"] >= 1], marker="o", markersize=3, label=r["mode"])
        keys = sorted(r["staleness"])
        ax_s.bar([k + (i - (len(results) - 1) / 2) * width for k in keys], [r["staleness"][k] for k in keys], width,
                 label=r["mode"])
    for ax, title, xlabel in ((ax_r, "reward/mean of the rollouts finished in a step", "samples trained"),
                              (ax_a, "held-out accuracy (greedy)", "samples trained"),
                              (ax_t, "seconds per step", "step"),
                              (ax_s, "staleness of trained groups", "policy versions behind")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_s.set_ylabel("groups", fontsize=8)
    ax_s.set_xticks(sorted({k for r in results for k in r["staleness"]}))
    fig.savefig(out_png, format="png", dpi=90)
    return out_png


_SPIN = ("import sys, time, torch; torch.set_num_threads(1); a = torch.randn(256, 256)\n"
         "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); t = time.perf_counter()\n"
         "for _ in range(1500): a @ a\nprint(time.perf_counter() - t)")


def overlap_capacity() -> float:
    """How many single-threaded workers this machine runs side by side right now (2.0 = two free cores): the same
    fixed matmul work alone, then in two processes started together. It bounds what overlapping can win back."""
    def spin(k: int) -> float:
        at = str(time.time() + 3.0)  # after torch is imported in both, so they really run at the same time
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN, at], stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return max(float(p.communicate()[0]) for p in procs)

    return round(2 * spin(1) / spin(2), 2)


class LoadSampler:
    """The 1-minute load average every few seconds in a thread: how busy the (shared) machine was during a mode.
    It counts our own processes too: about 1 busy process in synchronous mode, 2 in asynchronous mode."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        vals = self.samples or [os.getloadavg()[0]]
        return {"mean": round(statistics.fmean(vals), 2), "max": round(max(vals), 2)}


def machine(probe: bool = True) -> dict:
    """The machine and its load; `probe`: also its overlap capacity (~10 s: two timed torch processes), which
    smoke tests skip."""
    import torch

    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "loadavg": [round(x, 2) for x in load],
            "overlap_capacity": overlap_capacity() if probe else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="GRPO steps per mode (same samples in every mode)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-async")
    ap.add_argument("--modes", default="0,1,2,1:tis",
                    help="rollout.max_staleness values (0 = synchronous); K:tis also sets algorithm.off_policy=tis")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the throughput (start-up effects)")
    ap.add_argument("--quick", action="store_true", help="2 steps per mode on a tiny batch (smoke test)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = ap.parse_args(argv)
    try:
        modes = parse_modes(args.modes)
    except ValueError as err:
        ap.error(str(err))
    steps, skip = (min(args.steps, 2), 1) if args.quick else (args.steps, args.skip)
    if steps < 1:
        ap.error(f"--steps must be >= 1, got {steps}")
    overrides = BASE + (QUICK if args.quick else []) + [f"train.steps={steps}"] + args.set
    from commands.cli import DEFAULT_CONFIG
    from protocol.config import ExperimentConfig
    from protocol.overrides import load_config

    cfg = load_config(ExperimentConfig, DEFAULT_CONFIG, overrides)
    samples_per_step = cfg.train.prompts_per_step * cfg.sampling.n
    args.out.mkdir(parents=True, exist_ok=True)
    before, t0 = machine(probe=not args.quick), time.time()
    import ray

    from cluster.job import local_runtime_env
    from cluster.placement import init_ray

    init_ray(cfg.cluster, local_runtime_env())  # one local Ray for every mode (its start-up is not what we measure)
    results, warm = [], None
    for name, k, extra in modes:
        print(f"== {name}: {' '.join([f'rollout.max_staleness={k}', *extra])}, {steps} steps x {samples_per_step} samples",
              flush=True)
        load = LoadSampler()
        rows, result, warm = run_mode(k, overrides + extra, args.out / name, warm)
        results.append({**summarize(name, k, rows, result, samples_per_step, skip), "overrides": extra,
                        "loadavg_1m": load.stop()})
    ray.shutdown()
    report = {"machine": before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "overlap_capacity_after": overlap_capacity() if not args.quick else None, "overrides": overrides,
              "samples_per_step": samples_per_step, "skip": skip, "wall_s": time.time() - t0, "modes": results}
    sync = next((r for r in results if r["mode"] == "sync"), None)
    if sync:
        report["ratio_vs_sync"] = {r["mode"]: r["samples_per_s"] / sync["samples_per_s"] for r in results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "async_vs_sync.png")
    print(f"\nmachine: {before['cpus']} CPUs, Python {before['python']}, torch {before['torch']}, load average "
          f"{before['loadavg']} before, {report['loadavg_after']} after, overlap capacity {before['overlap_capacity']} "
          f"before, {report['overlap_capacity_after']} after (2.0 = two free cores); {samples_per_step} samples/step, "
          f"throughput over steps {skip + 1}..{steps}\n")
    print(table(results))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'async_vs_sync.png'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
