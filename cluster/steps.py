"""One training step of each mode, behind the same small interface the loop in cluster/driver.py drives.

GRPO: the learners take their groups from the stream while the scheduler keeps the rollout workers busy
(at most `rollout.max_staleness` versions ahead), then rank 0 broadcasts the new weights.
SFT (`train.mode: sft`, the papers' baseline): the same learners step on the prompts' answers; engines only
serve the evals, so weights go to them only when an eval is due.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict

import ray

from cluster.draws import DrawLedger
from cluster.job import Job
from cluster.step_metrics import eval_metrics, learner_metrics, rollout_metrics, sft_metrics
from protocol.results import LearnerStep, RolloutSummary
from telemetry.timer import StageTimer


def evaluate(job: Job, step: int) -> dict[str, float]:
    """Greedy held-out accuracy; every answer goes to eval/step-N.jsonl for inspection."""
    start = time.perf_counter()
    answers = job.evaluate()
    out = job.run_dir / "eval" / f"step-{step:06d}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(asdict(a)) + "\n" for a in answers))
    return {**eval_metrics(answers), "time/eval": time.perf_counter() - start}


def last_accuracy(steps, row: dict) -> str:
    """The progress bar's accuracy: the latest eval's, kept between evals (in steps.shown_accuracy)."""
    if "eval/accuracy" in row:
        steps.shown_accuracy = f"{row['eval/accuracy']:.3f}"
    return steps.shown_accuracy


class GRPOSteps:
    name = "GRPO"

    def __init__(self, job: Job) -> None:
        self.job = job
        self.ledger: DrawLedger = job.ledger()
        self.scheduler = job.scheduler(self.ledger)
        self.colocate = job.cfg.rollout.colocate
        self.staleness: Counter[int] = Counter()  # trained groups by policy versions behind
        self.trained: list[LearnerStep] = []  # this step's, for the exactly-once audit (trained.jsonl)
        self.shown_accuracy = "-"  # the progress bar's, until the first eval

    def run(self, step: int) -> dict[str, float]:
        timer = StageTimer()
        with timer("step"):
            with timer("train_wait"):
                learned, rollouts = self._train_while_rolling_out(version=step - 1)
            self.ledger.settle([d for r in learned for d in r.draws + r.stale_draws])
            backlog = self.job.backlog()
            with timer("sync"):  # between rollout calls (within one: rollout.partial_rollout)
                update = self.job.broadcast(step, rejoin=bool(self.ledger.revive()))
        self.staleness.update(s for r in learned for s in r.staleness)
        self.trained = learned
        return {
            **rollout_metrics(rollouts),
            **learner_metrics(learned),
            **backlog,
            **timer.row(),
            "sync/mb_per_s": update.mb_per_s,
            "sync/mb": update.bytes / 2**20,
            **self.job.epochs_row(),
        }

    def _train_while_rolling_out(self, version: int) -> tuple[list[LearnerStep], list[RolloutSummary]]:
        training = self.job.start_train(version, self.ledger.forget_below())
        rollouts: list[RolloutSummary] = []
        slept = False
        pending = training
        while pending:
            self.scheduler.fill(version)  # admission: idle workers get a chunk while staleness allows
            if self.colocate and not slept and not self.ledger.busy:
                # the step's samples are all in: the learners get the GPUs until the broadcast wakes engines
                self.job.sleep_engines()
                slept = True
            ray.wait(pending + self.scheduler.refs(), num_returns=1, timeout=1.0)
            rollouts += self.scheduler.poll(timeout_s=0)
            self.ledger.staleness.release(self.job.newly_released())  # stale groups the learners dropped
            pending = ray.wait(training, num_returns=len(training), timeout=0)[1]
        # a worker whose chunk came back with the step's last groups starts its next one now, ahead of the
        # broadcast (which it then takes after that chunk), when the staleness budget allows: else it would
        # idle through the broadcast whenever training ended before the driver saw the chunk return
        self.scheduler.fill(version)
        return self.job.finish_train(training), rollouts

    def evaluate(self, step: int) -> dict[str, float]:
        return evaluate(self.job, step)

    def audit_row(self, step: int) -> dict | None:
        """What trained.jsonl records: the draws and prompt ids trained on at this step."""
        return {"step": step, "draws": [d for r in self.trained for d in r.draws],
                "prompt_ids": [p for r in self.trained for p in r.prompt_ids]}

    def postfix(self, row: dict) -> dict[str, str]:
        reward = row.get("reward/mean", float("nan"))
        return {"reward": f"{reward:.2f}", "acc": last_accuracy(self, row)}


class SFTSteps:
    name = "SFT"

    def __init__(self, job: Job) -> None:
        self.job = job
        self.ledger: DrawLedger = job.ledger()  # carries the data order into checkpoints
        self.staleness: Counter[int] = Counter()
        self.shown_accuracy = "-"  # the progress bar's, until the first eval

    def run(self, step: int) -> dict[str, float]:
        timer = StageTimer()
        with timer("step"):
            batch = self.ledger.order.next_batch(self.job.cfg.train.prompts_per_step)
            ranks = self.job.sft_step(batch)
        return {**sft_metrics(ranks), **timer.row(), **self.job.epochs_row()}

    def evaluate(self, step: int) -> dict[str, float]:
        self.job.broadcast(step)  # the engines answer with the weights of this step
        return evaluate(self.job, step)

    def audit_row(self, step: int) -> dict | None:
        return None

    def postfix(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['sft_loss']:.3f}", "acc": last_accuracy(self, row)}
