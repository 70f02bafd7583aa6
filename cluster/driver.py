"""The RL loop, on one screen. Rollout runs ahead of training by at most `rollout.max_staleness` policy versions
(0 = synchronous: sample, train, broadcast). Setup lives in cluster/job.py, issuing work in cluster/scheduler.py."""
from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

import ray
from tqdm import tqdm

from cluster.job import Job
from protocol.config import ExperimentConfig
from telemetry.logs import run_logging
from telemetry.metrics import MetricsLogger, plot_histogram

TRAINED_FILE = "trained.jsonl"  # per step: the draws and prompt ids trained on


def train(cfg: ExperimentConfig, run_dir: str | Path, resume: str | bool | None = None) -> dict:
    if cfg.train.mode == "sft":  # the supervised baseline: same job, no rollout
        from cluster.sft import train_sft

        return train_sft(cfg, run_dir, resume)
    t_start, staleness_hist = time.time(), Counter()
    with run_logging(run_dir) as log, Job(cfg, run_dir, resume) as job:  # log: runs/NAME/driver.log, rotated
        first = job.state.step
        sched = job.scheduler()
        resume_step = first if resume else None
        with MetricsLogger(job.run_dir, cfg.train.tensorboard, resume_step) as metrics, \
                MetricsLogger(job.run_dir, False, resume_step, TRAINED_FILE, keep_rows=False) as trained:
            if first == 0:
                metrics.log({"step": 0, **evaluate(job, 0)})
            bar = tqdm(range(first + 1, cfg.train.steps + 1), desc="GRPO", initial=first, total=cfg.train.steps)
            for step in bar:
                t0, version = time.perf_counter(), step - 1
                training, rollouts, slept = job.start_train(version, sched.forget_below()), [], False
                while pending := ray.wait(training, num_returns=len(training), timeout=0)[1]:
                    sched.fill(version)  # admission: idle workers get a chunk while the staleness budget allows
                    if cfg.rollout.colocate and not sched.inflight and not slept:  # the step's samples are all in:
                        job.sleep_engines()  # the learners get the GPUs until the next broadcast wakes the engines
                        slept = True
                    ray.wait(pending + list(sched.inflight), num_returns=1, timeout=1.0)
                    rollouts += sched.poll(timeout_s=0)
                    sched.staleness.release(job.newly_released())  # stale groups dropped by the learners
                learned = job.finish_train(training)
                backlog = {k: v for k, v in job.buffer.metrics().items() if k in ("buffer/depth", "buffer/pending")}
                sched.settle([d for r in learned for d in r["draws"] + r["stale_draws"]])
                t1 = time.perf_counter()
                sync = job.broadcast(step, rejoin=bool(sched.revive()))  # between requests (mid-request: rollout.partial_rollout)
                t2 = time.perf_counter()
                staleness_hist.update(s for r in learned for s in r["staleness"])
                trained.log({"step": step, "draws": [d for r in learned for d in r["draws"]],  # exactly-once audit
                             "prompt_ids": [p for r in learned for p in r["prompt_ids"]]})
                row = {"step": step, **rollout_metrics(rollouts), **learner_metrics(learned), **backlog, "time/step": t2 - t0,
                       "time/train_wait": t1 - t0, "time/sync": t2 - t1, "sync/mb_per_s": sync["mb_per_s"],
                       "sync/mb": sync["bytes"] / 2**20, **{f"data/{n}/epoch": e for n, e in job.order.epochs().items()}}
                if due(cfg.train.eval_every, step, cfg.train.steps):
                    row.update(evaluate(job, step))
                metrics.log(row)
                log.info("step %d: %s", step, json.dumps({k: round(v, 4) for k, v in row.items() if isinstance(v, float)}))
                if due(cfg.train.save_every, step, cfg.train.steps):
                    job.save(step, sched, score=row.get("eval/accuracy"))
                bar.set_postfix(reward=f"{row.get('reward/mean', float('nan')):.2f}", acc=row.get("eval/accuracy", ""))
        evals = [r for r in metrics.rows if "eval/accuracy" in r]
    (job.run_dir / "staleness.json").write_text(json.dumps(dict(sorted(staleness_hist.items()))))
    plot_histogram(staleness_hist, job.run_dir / "staleness.png", f"staleness of trained groups, {cfg.train.steps} steps "
                   f"(max_staleness {cfg.rollout.max_staleness})", "policy versions behind the learner")
    return {"grpo_start": evals[0]["eval/accuracy"], "final": evals[-1]["eval/accuracy"], "steps": cfg.train.steps,
            "seconds": time.time() - t_start, "run_dir": str(run_dir), "staleness": dict(sorted(staleness_hist.items()))}


def due(every: int, step: int, last: int) -> bool:
    """Evals and checkpoints: every `every` steps (0 = never) and always at the last step."""
    return bool(every) and step % every == 0 or step == last


def evaluate(job: Job, step: int) -> dict:
    """Greedy held-out accuracy per data set; eval/accuracy is their unweighted mean (each data set counts once)."""
    t0 = time.perf_counter()
    results = job.evaluate()
    out = job.run_dir / "eval" / f"step-{step:06d}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in results))  # the raw answers, for inspection
    by_dataset: dict[str, list[float]] = {}
    for r in results:
        by_dataset.setdefault(r["dataset"], []).append(r["correct"])
    row = {f"eval/{name}/accuracy": statistics.fmean(v) for name, v in by_dataset.items()} if len(by_dataset) > 1 else {}
    return {"eval/accuracy": statistics.fmean(statistics.fmean(v) for v in by_dataset.values()), **row,
            "time/eval": time.perf_counter() - t0}


def rollout_metrics(parts: list[dict]) -> dict:
    """Over the chunks that finished during this step (none, when rollout ran far enough ahead)."""
    per_dataset = [(name, d) for p in parts for name, d in p["datasets"].items()]
    rewards = [r for _, d in per_dataset for r in d["rewards"]]
    lengths = [n for p in parts for n in p["lengths"]]
    if not rewards:
        return {}
    row = {"reward/mean": statistics.fmean(rewards), "reward/std": statistics.pstdev(rewards),
           "length/mean": statistics.fmean(lengths), "length/max": max(lengths),
           "length/truncated": sum(p["truncated"] for p in parts) / len(lengths),
           "dropped/filtered": sum(len(p["filtered"]) for p in parts)}
    spans = [s for p in parts for s in p["version_spans"]]  # > 0: continued under newer weights (partial rollout)
    row.update({"rollout/partial_frac": sum(s > 0 for s in spans) / len(spans), "rollout/span_max": max(spans)})
    for comp in {c for _, d in per_dataset for c in d["components"]}:  # data sets may have different components
        row[f"reward/{comp}"] = statistics.fmean(v for _, d in per_dataset for v in d["components"].get(comp, []))
    datasets = {name for name, _ in per_dataset}
    for name in sorted(datasets) if len(datasets) > 1 else []:
        per = [d for n, d in per_dataset if n == name]
        row[f"reward/{name}/mean"] = statistics.fmean(r for d in per for r in d["rewards"])
        for comp in per[0]["components"]:
            row[f"reward/{name}/{comp}"] = statistics.fmean(v for d in per for v in d["components"][comp])
    for stage in parts[0]["times"]:  # summed over chunks and workers: busy seconds, not wall time
        row[f"time/{stage}"] = sum(p["times"][stage] for p in parts)
    return row


def learner_metrics(ranks: list[dict]) -> dict:
    keys = [k for k, v in ranks[0].items() if isinstance(v, float | int) and not k.startswith(("buffer/", "dropped/"))]
    row = {k: statistics.fmean(r[k] for r in ranks) for k in keys}
    lags = [s for r in ranks for s in r["staleness"]]
    row.update({"staleness/mean": statistics.fmean(lags), "staleness/max": max(lags),
                "dropped/stale": sum(r["dropped/stale"] for r in ranks),
                "dropped/duplicate": sum(r["dropped/duplicate"] for r in ranks)})
    row.update({k: sum(r[k] for r in ranks) for k in ("buffer/lost", "buffer/corrupt")})
    return row
