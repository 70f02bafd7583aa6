"""The training loop, on one screen. Setup lives in cluster/job.py, one step of each mode in cluster/steps.py.

Rollout runs ahead of training by at most `rollout.max_staleness` policy versions (0 = synchronous: sample,
train, broadcast); `train.mode: sft` runs the supervised baseline through the same loop.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from cluster.job import Job
from cluster.steps import GRPOSteps, SFTSteps, evaluate
from protocol.config import ExperimentConfig
from telemetry.collapse import CollapseWatch
from telemetry.logs import run_logging
from telemetry.metrics import MetricsLogger
from telemetry.plots import plot_histogram

TRAINED_FILE = "trained.jsonl"  # per step: the draws and prompt ids trained on (the exactly-once audit)


def train(cfg: ExperimentConfig, run_dir: str | Path, resume: str | bool | None = None) -> dict:
    started = time.time()
    with run_logging(run_dir) as log, Job(cfg, run_dir, resume) as job:
        steps = GRPOSteps(job) if cfg.train.mode == "grpo" else SFTSteps(job)
        first = job.state.step
        resumed_at = first if resume else None
        with MetricsLogger(job.run_dir, cfg.train.loggers, resumed_at) as metrics, \
                MetricsLogger(job.run_dir, (), resumed_at, TRAINED_FILE, keep_rows=False) as trained:
            if first == 0 and cfg.train.eval_at_start:
                metrics.log({"step": 0, **evaluate(job, 0)})
            watch = CollapseWatch(window=cfg.train.collapse_window)  # warns when GRPO stops learning
            bar = tqdm(range(first + 1, cfg.train.steps + 1), desc=steps.name, initial=first,
                       total=cfg.train.steps)
            for step in bar:
                row = {"step": step, **steps.run(step)}
                if due(cfg.train.eval_every, step, cfg.train.steps):
                    row.update(steps.evaluate(step))
                metrics.log(watch.observe(row))
                audit = steps.audit_row(step)
                if audit:
                    trained.log(audit)
                log.info("step %d: %s", step, json.dumps(rounded(row)))
                if due(cfg.train.save_every, step, cfg.train.steps):
                    job.save(step, steps.ledger, score=row.get("eval/accuracy"))
                bar.set_postfix(steps.postfix(row))
        accuracies = [r["eval/accuracy"] for r in metrics.rows if "eval/accuracy" in r]
    if cfg.train.mode == "grpo":
        write_staleness(steps.staleness, job.run_dir, cfg)
    staleness = dict(sorted(steps.staleness.items()))
    start = accuracies[0] if cfg.train.eval_at_start or resume else None
    return {"grpo_start": start, "final": accuracies[-1], "steps": cfg.train.steps,
            "seconds": time.time() - started, "run_dir": str(run_dir), "staleness": staleness}


def due(every: int, step: int, last: int) -> bool:
    """Evals and checkpoints: every `every` steps (0 = never) and always at the last step."""
    return bool(every) and step % every == 0 or step == last


def rounded(row: dict) -> dict[str, float]:
    return {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}


def write_staleness(counts: dict[int, int], run_dir: Path, cfg: ExperimentConfig) -> None:
    """How many policy versions behind each trained group was: staleness.json and a histogram."""
    (run_dir / "staleness.json").write_text(json.dumps(dict(sorted(counts.items()))))
    bound = cfg.rollout.max_staleness
    title = f"staleness of trained groups, {cfg.train.steps} steps (max_staleness {bound})"
    plot_histogram(counts, run_dir / "staleness.png", title, "policy versions behind the learner")
