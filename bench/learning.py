"""Does GRPO learn on data it was not tuned for? Held-out accuracy against steps and wall time for GRPO with
the embedded defaults, GRPO with the papers' algorithm settings, and SFT, on several data sets and seeds.

    python bench/learning.py                     # 5 data sets x 3 arms x 3 seeds, 300 steps (hours on 2 cores)
    python bench/learning.py --quick             # the smoke test: digits10, 2 arms, 1 seed, 4 steps
    python bench/learning.py --datasets digits10 --arms grpo_default,sft --seeds 0 --steps 100

Every run is `clsrl train configs/cpu_demo.yaml` with the arm's and the data set's overrides and
`train.seed`; accuracy is the greedy held-out accuracy the run logs (eval/accuracy), wall time the driver's
step and eval seconds summed (start-up and warm start excluded, reported apart). Per data set and arm: mean
and spread (min-max over seeds) of the start and final accuracy, the gain, the entropy over the last 10
steps and the collapse warnings (telemetry/collapse.py). Targets, checked for GRPO with the
defaults on each classification set: a gain of at least 0.30 and entropy above 0.3 at the end.
Writes OUT/results.json, OUT/accuracy_vs_step.png, OUT/accuracy_vs_time.png; prints markdown tables.
"""
from __future__ import annotations

import argparse
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

from bench.learning_data import CLASSES, dataset_overrides  # noqa: E402
from telemetry.collapse import replay  # noqa: E402
from telemetry.plots import plot_bands  # noqa: E402
from telemetry.tables import md_table  # noqa: E402

# The papers' GRPO (configs/no_think.yaml: G 4, KL 0.04 k3, symmetric clip 0.2, every group kept, linear decay)
# at the tiny model's learning rate of the old demo: the papers' 1e-6 leaves a random 0.6M model where it is.
ARMS = {
    "grpo_default": [],  # configs/cpu_demo.yaml as shipped
    "grpo_paper": ["sampling.n=4", "algorithm.beta=0.04", "algorithm.kl=k3", "algorithm.clip_low=0.2",
                   "algorithm.clip_high=0.2", "algorithm.dynamic_sampling=false", "algorithm.advantage_eps=1e-4",
                   "learner.lr=1e-3", "learner.lr_schedule=linear", "learner.warmup_steps=0"],
    "sft": ["train.mode=sft", "learner.micro_batch_size=8"],  # 16 prompts / 2 ranks: 8 sequences a rank
}
DATASETS = ["shapes", "digits4", "digits10", "shapes12", "shapes_vqa"]
CLASSIFICATION = {"shapes", "digits", "digits4", "digits10", "shapes12"}  # shapes_vqa: 2 choices, not classes
TARGET_GAIN, ENTROPY_FLOOR = 0.30, 0.3
# 2 warm-start steps leave no right answer to keep: dynamic sampling off, or it would only redraw
QUICK = ["train.warm_start_steps=2", "data.eval_limit=8", "train.prompts_per_step=4", "sampling.n=4",
         "learner.micro_batch_size=2", "algorithm.dynamic_sampling=false",  # micro-batches of 2 sequences
         "cluster.rollout_workers=1", "cluster.learner_ranks=1"]  # the smoke test: one actor of each kind


def run_one(out: Path, dataset: str, arm: str, seed: int, steps: int, eval_every: int, extra: list[str],
            collect: bool = False) -> dict | None:
    """One training run (reused when it finished before); its accuracy curve and health. `collect`: only
    finished runs, None for the others."""
    run_dir = out / "runs" / f"{dataset}-{arm}-s{seed}"
    done = run_dir / "bench_done.json"
    if collect and not done.is_file():
        return None
    if not done.is_file():
        overrides = [*dataset_overrides(dataset, out / "data"), *ARMS[arm], f"train.steps={steps}",
                     f"train.eval_every={eval_every}", "train.save_every=0", "train.loggers=[]",
                     f"train.seed={seed}", *extra]
        cmd = [sys.executable, "-m", "commands.cli", "train", str(ROOT / "configs" / "cpu_demo.yaml"),
               *overrides, "--run-dir", str(run_dir)]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{dataset}/{arm}/seed {seed} failed (rc {proc.returncode}): "
                             f"{' '.join(overrides)}\n{proc.stderr[-3000:]}")
        done.write_text(json.dumps({"seconds": time.time() - start}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    wall, curve = 0.0, []
    for r in sorted(rows, key=lambda r: r["step"]):
        wall += r.get("time/step", 0.0) + r.get("time/eval", 0.0)
        if "eval/accuracy" in r:
            curve.append((r["step"], wall, r["eval/accuracy"]))
    entropy = [r["entropy"] for r in rows if isinstance(r.get("entropy"), float)][-10:]
    diversity = [r["eval/answer_diversity"] for r in rows if "eval/answer_diversity" in r]
    return {"dataset": dataset, "arm": arm, "seed": seed, "curve": curve, "start": curve[0][2],
            "final": curve[-1][2], "entropy_end": statistics.fmean(entropy) if entropy else None,
            "diversity_end": diversity[-1] if diversity else None, "collapse_warnings": len(replay(rows)),
            "loop_s": wall, "run_s": json.loads(done.read_text())["seconds"]}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarize(results: list[dict]) -> list[dict]:
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((r["dataset"], r["arm"]), []).append(r)
    out = []
    for (dataset, arm), runs in cells.items():
        gains = [r["final"] - r["start"] for r in runs]
        entropy = [r["entropy_end"] for r in runs if r["entropy_end"] is not None]
        row = {"dataset": dataset, "arm": arm, "seeds": len(runs), "steps": max(r["curve"][-1][0] for r in runs),
               "start": [r["start"] for r in runs],
               "final": [r["final"] for r in runs], "gain": gains,
               "entropy_end": min(entropy) if entropy else None,
               "collapse_warnings": sum(r["collapse_warnings"] for r in runs),
               "loop_s": statistics.fmean(r["loop_s"] for r in runs),
               "run_s": statistics.fmean(r["run_s"] for r in runs)}
        if arm == "grpo_default" and dataset in CLASSIFICATION:
            misses = [f"gain {statistics.fmean(gains):+.2f} < {TARGET_GAIN}"] \
                if statistics.fmean(gains) < TARGET_GAIN else []
            if row["entropy_end"] is not None and row["entropy_end"] <= ENTROPY_FLOOR:
                misses.append(f"entropy {row['entropy_end']:.2f} <= {ENTROPY_FLOOR}")
            row["target"] = "met" if not misses else "missed: " + "; ".join(misses)
        out.append(row)
    return out


def tables(summary: list[dict]) -> str:
    rows = []
    for s in summary:
        entropy = "-" if s["entropy_end"] is None else f"{s['entropy_end']:.2f}"
        rows.append([f"{s['dataset']} ({CLASSES.get(s['dataset'], '?')})", s["arm"], s["seeds"], s["steps"],
                     _spread(s["start"]), _spread(s["final"]), _spread(s["gain"]), entropy,
                     s["collapse_warnings"], f"{s['loop_s']:.0f}", f"{s['run_s']:.0f}", s.get("target", "")])
    header = ["data set (classes)", "arm", "seeds", "steps", "acc. start", "acc. final", "gain", "entropy end (min)",
              "collapse warnings", "loop s", "run s", "target (defaults)"]
    text = md_table(header, rows, "llrrrrrrrrrl") + "\n"
    gaps = []
    by = {(s["dataset"], s["arm"]): s for s in summary}
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        sft = by.get((dataset, "sft"))
        for arm in ("grpo_default", "grpo_paper"):
            if sft and (dataset, arm) in by:
                gap = statistics.fmean(by[(dataset, arm)]["final"]) - statistics.fmean(sft["final"])
                gaps.append([dataset, arm, f"{gap:+.3f}"])
    if gaps:
        text += "\n" + md_table(["data set", "GRPO arm", "final accuracy minus SFT's"], gaps, "llr") + "\n"
    return text


def plots(results: list[dict], out: Path) -> None:
    for name, axis, xlabel in (("accuracy_vs_step", 0, "step"), ("accuracy_vs_time", 1, "loop seconds")):
        panels: dict[str, dict] = {}
        for dataset in dict.fromkeys(r["dataset"] for r in results):
            for arm in dict.fromkeys(r["arm"] for r in results if r["dataset"] == dataset):
                runs = [r["curve"] for r in results if r["dataset"] == dataset and r["arm"] == arm]
                n = min(len(c) for c in runs)
                x = [statistics.fmean(c[i][axis] for c in runs) for i in range(n)]
                acc = [[c[i][2] for c in runs] for i in range(n)]
                panels.setdefault(dataset, {})[arm] = (x, [statistics.fmean(a) for a in acc],
                                                        [min(a) for a in acc], [max(a) for a in acc])
        plot_bands(panels, out / f"{name}.png", xlabel, "held-out accuracy",
                   f"held-out accuracy vs {xlabel} (mean, min-max over seeds)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "learning")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="smoke test: digits10, 2 arms, 1 seed, 4 steps")
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    p.add_argument("--collect", action="store_true", help="tables and plots of the runs finished so far")
    args = p.parse_args(argv)
    extra = list(args.set)
    if args.quick:
        args.datasets, args.arms, args.seeds, args.steps, args.eval_every = "digits10", \
            "grpo_default,sft", "0", 4, 2
        extra = QUICK + extra
    datasets, arms = args.datasets.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; available: {list(ARMS)}")
    results = []
    for dataset in datasets:
        for arm in arms:
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run_one(args.out, dataset, arm, seed, args.steps, args.eval_every, extra, args.collect)
                if r is None:
                    continue
                results.append(r)
                print(f"{dataset} {arm} seed {seed}: {r['start']:.3f} -> {r['final']:.3f} in "
                      f"{r['run_s']:.0f}s", file=sys.stderr, flush=True)
    summary = summarize(results)
    (args.out / "results.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    plots(results, args.out)
    print(f"{args.steps} steps, eval every {args.eval_every}; accuracy: mean [min, max] over the seeds run\n")
    print(tables(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
