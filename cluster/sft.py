"""The SFT baseline the papers compare against (`train.mode: sft`): the same learner group, data, evals and
checkpoints as GRPO, but each step is supervised fine-tuning on the prompts' answers (the class name, wrapped in
think/answer tags when the task's prompt asks for them). Engines only serve the evals, so weights go to them
only when an eval is due."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from tqdm import tqdm

from cluster.job import Job
from protocol.config import ExperimentConfig
from telemetry.logs import run_logging
from telemetry.metrics import MetricsLogger


def train_sft(cfg: ExperimentConfig, run_dir: str | Path, resume: str | bool | None = None) -> dict:
    from cluster.driver import due, evaluate

    t_start = time.time()
    with run_logging(run_dir) as log, Job(cfg, run_dir, resume) as job:
        first, sched = job.state.step, job.scheduler()  # the scheduler only carries the data order into checkpoints
        with MetricsLogger(job.run_dir, cfg.train.tensorboard, first if resume else None) as metrics:
            if first == 0:
                metrics.log({"step": 0, **evaluate(job, 0)})
            bar = tqdm(range(first + 1, cfg.train.steps + 1), desc="SFT", initial=first, total=cfg.train.steps)
            for step in bar:
                t0 = time.perf_counter()
                ranks = job.sft_step(sched.order.next_batch(cfg.train.prompts_per_step))
                row = {"step": step, **{k: statistics.fmean(r[k] for r in ranks) for k in ranks[0]},
                       "time/step": time.perf_counter() - t0, **{f"data/{n}/epoch": e for n, e in job.order.epochs().items()}}
                if due(cfg.train.eval_every, step, cfg.train.steps):
                    job.broadcast(step)
                    row.update(evaluate(job, step))
                metrics.log(row)
                log.info("step %d: sft_loss %.4f", step, row["sft_loss"])
                if due(cfg.train.save_every, step, cfg.train.steps):
                    job.save(step, sched, score=row.get("eval/accuracy"))
                bar.set_postfix(loss=f"{row['sft_loss']:.3f}", acc=row.get("eval/accuracy", ""))
        evals = [r for r in metrics.rows if "eval/accuracy" in r]
    return {"grpo_start": evals[0]["eval/accuracy"], "final": evals[-1]["eval/accuracy"], "steps": cfg.train.steps,
            "seconds": time.time() - t_start, "run_dir": str(run_dir), "staleness": {}}
