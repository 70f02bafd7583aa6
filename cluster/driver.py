"""The RL loop: rollout -> train -> broadcast, on-policy, through the Redis stream. Setup lives in cluster/job.py."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from cluster.config import ExperimentConfig
from cluster.job import Job
from cluster.metrics import MetricsLogger


def train(cfg: ExperimentConfig, run_dir: str | Path, resume: str | bool | None = None) -> dict:
    t_start = time.time()
    with Job(cfg, run_dir, resume) as job:
        first = job.state.step
        metrics = MetricsLogger(job.run_dir, cfg.train.tensorboard, resume_step=first if resume else None)
        with metrics:
            if first == 0:
                metrics.log({"step": 0, **evaluate(job, 0)})
            bar = tqdm(range(first + 1, cfg.train.steps + 1), desc="GRPO", initial=first, total=cfg.train.steps)
            for step in bar:
                ids = job.order.take(cfg.train.prompts_per_step)
                t0 = time.perf_counter()
                rollouts = job.rollout(ids, step)  # generate, score, publish to the stream
                t1 = time.perf_counter()
                learned = job.train()  # each rank takes its share from the stream, steps, acks
                t2 = time.perf_counter()
                sync = job.broadcast(step)  # policy version = optimizer steps taken
                t3 = time.perf_counter()
                row = {"step": step, **rollout_metrics(rollouts), **learner_metrics(learned, ids, step),
                       "time/rollout": t1 - t0, "time/train": t2 - t1, "time/sync": t3 - t2,
                       "sync/mb_per_s": sync["mb_per_s"], "sync/mb": sync["bytes"] / 2**20}
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    row.update(evaluate(job, step))
                metrics.log(row)
                if cfg.train.save_every and step % cfg.train.save_every == 0 or step == cfg.train.steps:
                    job.save(step)
                bar.set_postfix(reward=f"{row['reward/mean']:.2f}", acc=row.get("eval/accuracy", ""))
        evals = [r for r in metrics.rows if "eval/accuracy" in r]
    return {"grpo_start": evals[0]["eval/accuracy"], "final": evals[-1]["eval/accuracy"], "steps": cfg.train.steps,
            "seconds": time.time() - t_start, "run_dir": str(run_dir)}


def evaluate(job: Job, step: int) -> dict:
    t0 = time.perf_counter()
    results = job.evaluate()
    out = job.run_dir / "eval" / f"step-{step:06d}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))  # the raw answers, for inspection
    return {"eval/accuracy": sum(r["correct"] for r in results) / len(results), "time/eval": time.perf_counter() - t0}


def rollout_metrics(parts: list[dict]) -> dict:
    rewards = [r for p in parts for r in p["rewards"]]
    lengths = [n for p in parts for n in p["lengths"]]
    row = {"reward/mean": statistics.fmean(rewards), "reward/std": statistics.pstdev(rewards),
           "length/mean": statistics.fmean(lengths), "length/max": max(lengths),
           "length/truncated": sum(p["truncated"] for p in parts) / len(lengths)}
    for name in parts[0]["components"]:
        row[f"reward/{name}"] = statistics.fmean(v for p in parts for v in p["components"][name])
    for stage in parts[0]["times"]:  # the slowest worker sets the pace
        row[f"time/{stage}"] = max(p["times"][stage] for p in parts)
    return row


def learner_metrics(ranks: list[dict], ids: list[str], step: int) -> dict:
    trained = sorted(i for r in ranks for i in r["prompt_ids"])
    if trained != sorted(ids):  # exactly once: every prompt of the step, no leftovers, no repeats
        raise RuntimeError(f"step {step}: the learners trained on {len(trained)} groups that are not this step's "
                           f"{len(ids)} prompts (missing {sorted(set(ids) - set(trained))[:5]}, "
                           f"extra {sorted(set(trained) - set(ids))[:5]})")
    keys = [k for k, v in ranks[0].items() if isinstance(v, float | int) and not k.startswith("buffer/")]
    row = {k: statistics.fmean(r[k] for r in ranks) for k in keys if k not in ("min_version", "max_version")}
    row["staleness/max"] = step - 1 - min(r["min_version"] for r in ranks)  # 0 on-policy: sampled by the last weights
    row.update({k: v for k, v in ranks[0].items() if k.startswith("buffer/")})
    return row
