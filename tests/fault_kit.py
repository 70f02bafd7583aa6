"""Shared by the fault tests: a small fast config, a recorder that watches a real `cluster.driver.train` run from
inside the test process, the run's actor processes found by pid, and exactly-once accounting by draw.

    rec = Recorder(monkeypatch)               # before train(): wraps a few Job methods, calls the real ones
    with Background(kill_something):          # a thread that injects the fault while train() runs
        train(cfg, run_dir)
    check_each_draw_once(*rec.trained(), rec.schedulers[-1], rec.job, cfg.train.seed)

The recorder only observes: every wrapped method runs unchanged and its result is passed through. What it
records is the learners' own report of what they trained on (draw ids and prompt ids), the independent truth
the accounting checks the scheduler against.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray

import telemetry.logs
from cluster.job import Job
from cluster.scheduler import RolloutScheduler
from commands.cli import DEFAULT_CONFIG
from protocol.config import ExperimentConfig
from protocol.overrides import load_config
from tasks.mixture import dataset_seed
from tasks.order import EpochOrder

# chunks of 2 prompts, 4 prompts x 4 samples per step: a step takes about a second on a shared 2-core machine.
# no format warm start: no group has a right answer, so dynamic sampling (on by default) would only redraw
BASE = ["train.warm_start_steps=0", "train.prompts_per_step=4", "train.eval_every=0", "train.save_every=0",
        "train.loggers=[]", "data.eval_limit=4", "sampling.n=4", "sampling.max_new_tokens=8",
        "learner.micro_batch_size=8", "rollout.prompts_per_call=2", "weight_sync.timeout_s=15",
        "weight_sync.heartbeat_s=0.5", "algorithm.dynamic_sampling=false"]


def make_cfg(*extra: str, rollout_workers: int = 1, learner_ranks: int = 1) -> ExperimentConfig:
    """BASE on the demo config, one actor of each kind unless the fault needs a second (a worker or rank to
    kill while the other goes on): each actor costs ~5 s of CPU to start (torch, transformers, DeepSpeed)."""
    cluster = [f"cluster.rollout_workers={rollout_workers}", f"cluster.learner_ranks={learner_ranks}"]
    return load_config(ExperimentConfig, DEFAULT_CONFIG, BASE + cluster + list(extra))


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


# ---- processes ----

def title(proc: psutil.Process) -> str:
    """Ray sets an actor process's title to ray::Class, or ray::Class.method while a call runs."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""
    return cmd[0] if cmd else ""


def actor_processes(cls: str) -> list[psutil.Process]:
    """This test process's own Ray actors of class `cls` (the local cluster is our descendant; other people's
    Ray clusters on the machine are not)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        t = title(p)
        if t == f"ray::{cls}" or t.startswith(f"ray::{cls}."):
            out.append(p)
    return out


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class Cancelled(Exception):
    """The test is over (passed or failed): a fault thread still waiting gives up instead of acting later."""


_fault_thread = threading.local()  # .stop: set when the Background that runs this thread exits


def wait_until(cond: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    stop = getattr(_fault_thread, "stop", None)
    while True:
        got = cond()
        if got:
            return got
        if stop is not None and stop.is_set():
            raise Cancelled(f"stopped waiting for {what}: the run is over")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(every_s)


def wait_busy_in(proc: psutil.Process, method: str, cpu_s: float, timeout_s: float) -> None:
    """Until `proc` runs `method` and has spent `cpu_s` CPU seconds inside that one call (working, not queued)."""
    base: list[float] = []

    def working() -> bool:
        if not title(proc).endswith(f".{method}"):
            base.clear()  # between calls: measure the next call from its start
            return False
        now = cpu_seconds(proc)
        if not base:
            base.append(now)
        return now - base[0] >= cpu_s

    wait_until(working, timeout_s, f"pid {proc.pid} to work {cpu_s}s of CPU inside {method}()", every_s=0.02)


# ---- watching a train() run ----

@dataclass
class Run:
    """One Job (one train() call): the step it started after, and each finished step's per-rank reports."""

    first: int
    job: Job
    steps: list[list[dict]] = field(default_factory=list)

    def step(self, i: int) -> int:
        return self.first + 1 + i


class Recorder:
    """Wraps Job.scheduler / finish_train / broadcast and telemetry.logs.announce's `print`."""

    def __init__(self, monkeypatch, after_broadcast: bool = False, keep_steps: bool = True) -> None:
        self.runs: list[Run] = []
        self.schedulers: list[RolloutScheduler] = []
        self.lines: list[tuple[float, str]] = []  # (monotonic time, text) of what the runtime printed
        self.pids: list[dict[str, list[int]]] = []  # per run, at its start: {"rollout": [...], "learner": [...]}
        self.synced: list[dict] = []  # after each broadcast (after_broadcast=True): what every engine holds
        self.before_broadcast: Callable[[Job, int], None] | None = None
        self._after_broadcast = after_broadcast
        scheduler, finish, broadcast = Job.scheduler, Job.finish_train, Job.broadcast

        def wrapped_scheduler(job: Job, ledger) -> RolloutScheduler:
            sched = scheduler(job, ledger)
            self.runs.append(Run(job.state.step, job))
            self.schedulers.append(sched)
            self.pids.append({"rollout": [i["pid"] for i in ray.get([w.info.remote() for w in job.rollout_workers])],
                              "learner": ray.get([a.pid.remote() for a in job.learners])})
            return sched

        def wrapped_finish(job: Job, refs: list) -> list:
            learned = finish(job, refs)
            self.runs[-1].steps.append(learned if keep_steps else [])  # [] : a memory test measures the driver
            return learned

        def wrapped_broadcast(job: Job, version: int, *args, **kwargs) -> dict:
            in_loop = bool(self.runs) and self.runs[-1].job is job  # not the one Job setup makes
            if in_loop and self.before_broadcast is not None:
                self.before_broadcast(job, version)
            stats = broadcast(job, version, *args, **kwargs)
            if in_loop and self._after_broadcast:
                self.synced.append(self._engines(job, version))
            return stats

        def tee(*args, **kwargs) -> None:
            self.lines.append((time.monotonic(), " ".join(str(a) for a in args)))
            print(*args, **kwargs)

        monkeypatch.setattr(Job, "scheduler", wrapped_scheduler)
        monkeypatch.setattr(Job, "finish_train", wrapped_finish)
        monkeypatch.setattr(Job, "broadcast", wrapped_broadcast)
        monkeypatch.setattr(telemetry.logs, "print", tee, raising=False)  # announce(): every line the runtime tells the user

    @staticmethod
    def _engines(job: Job, version: int) -> dict:
        """Every engine's pid and version, and whether its weights are bit-equal to learner rank 0's."""
        learner = ray.get(job.learners[0].checksums.remote())
        infos = ray.get([w.info.remote() for w in job.rollout_workers])
        same = [ray.get(w.checksums.remote()) == learner for w in job.rollout_workers]
        return {"version": version, "pids": [i["pid"] for i in infos],
                "versions": [i["policy_version"] for i in infos], "same_weights": same}

    @property
    def job(self) -> Job | None:
        return self.runs[-1].job if self.runs else None

    def printed(self, text: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if text in line]

    def trained(self, upto: dict[int, int] | None = None) -> tuple[list[tuple[int, str]], list[int]]:
        """((draw, prompt id) trained on, draws dropped as stale) over all runs; `upto` {run index: last step}
        keeps only the steps a later resume did not redo."""
        done, stale = [], []
        for k, run in enumerate(self.runs):
            for i, ranks in enumerate(run.steps):
                if upto is not None and k in upto and run.step(i) > upto[k]:
                    continue
                for r in ranks:
                    done += list(zip(r.draws, r.prompt_ids))
                    stale += r.stale_draws
        return done, stale


def check_each_draw_once(done: list[tuple[int, str]], stale: list[int], sched: RolloutScheduler, job: Job,
                         seed: int) -> None:
    """Every draw issued is trained on once or dropped as stale once, or still outstanding at the end; no draw
    twice; and draw d is the d-th prompt of the data order (nothing repeated, nothing skipped)."""
    counts = Counter([d for d, _ in done] + stale)
    twice = sorted(d for d, n in counts.items() if n > 1)
    assert not twice, f"draws trained on or dropped more than once: {twice}"
    ledger = sched.ledger
    left = set(ledger.outstanding) | {d for d, _ in ledger.reissue}
    assert not left & set(counts), f"draws both done and outstanding: {sorted(left & set(counts))}"
    missing = set(range(ledger.next_draw)) - set(counts) - left
    assert not missing, f"draws issued but neither trained on, dropped nor outstanding: {sorted(missing)}"
    assert set(counts) <= set(range(ledger.next_draw))
    (name,) = {e.dataset for e in job.train_examples}  # one data set: its mixture order is its own epoch order
    order = EpochOrder([e.id for e in job.train_examples], dataset_seed(seed, name)).take(ledger.next_draw)
    wrong = [(d, pid, order[d]) for d, pid in done if order[d] != pid]
    assert not wrong, f"(draw, trained prompt, the data order's prompt) differ: {wrong[:5]}"


class Background:
    """Runs fn() on a thread while the `with` body runs (the train() call); `result` is what fn returned.

    Leaving the block stops fn's waits (wait_until raises Cancelled) and joins the thread; an error fn raised is
    re-raised unless the block raised its own. The thread lives until then even after fn returns: a
    redis-server started from it gets SIGTERM when the thread ends (PR_SET_PDEATHSIG follows the thread).
    """

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.result: object = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="fault")

    def _run(self, fn: Callable[[], object]) -> None:
        _fault_thread.stop = self.stop
        try:
            self.result = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in __exit__
            self.error = err
        self.stop.wait()

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.set()
        self._thread.join(60)
        if exc_type is None and self.error is not None:
            raise self.error
