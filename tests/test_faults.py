"""Faults injected into a real run: real Ray actors, Redis and DeepSpeed ranks, processes killed or frozen by pid
while `cluster.driver.train` runs in this process. Each test asserts the recovery: every step finished, every
draw trained on exactly once (counted from the learners' own reports), the message names what failed.
What a user sees and does for each fault: docs/faults.md.
"""
from __future__ import annotations

import logging
import signal
import time

import psutil
import pytest

from cluster.checkpoint import complete_tags, read_checkpoint
from cluster.driver import train
from stream.buffer import RolloutBuffer
from tests.fault_kit import (
    Background,
    Recorder,
    actor_processes,
    check_each_draw_once,
    cpu_seconds,
    last_step,
    make_cfg,
    read_rows,
    title,
    wait_busy_in,
    wait_until,
)

pytestmark = pytest.mark.slow

STARTUP_S = 600  # waits that include starting the Job (Ray actors, DeepSpeed) on a loaded 2-core machine


def _all_steps(run_dir, steps: int) -> list[dict]:
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    return rows[1:]


def _each_draw_once_sync(rec: Recorder, cfg) -> None:
    """Synchronous runs: exactly steps x prompts_per_step draws, each trained on once, none dropped."""
    done, stale = rec.trained()
    check_each_draw_once(done, stale, rec.schedulers[-1], rec.job, cfg.train.seed)
    assert len(done) == cfg.train.steps * cfg.train.prompts_per_step and stale == []


def _engines_hold_the_learners_weights(rec: Recorder) -> None:
    for s in rec.synced:  # after every broadcast, the replacement engine included
        assert s["versions"] == [s["version"]] * len(s["pids"]) and all(s["same_weights"]), s


def test_rollout_worker_killed_mid_generation_is_restarted_and_its_prompts_reissued(ray_local, tmp_path, monkeypatch):
    cfg = make_cfg("train.steps=6", "sampling.max_new_tokens=192", rollout_workers=2)  # long generations: the kill lands inside one
    rec = Recorder(monkeypatch, after_broadcast=True)

    def kill_worker_1_while_generating() -> int:
        wait_until(lambda: last_step(tmp_path) >= 1, STARTUP_S, "step 1")
        victim = psutil.Process(rec.pids[0]["rollout"][1])
        wait_busy_in(victim, "rollout", cpu_s=0.1, timeout_s=120)  # a call takes ~0.3 s of CPU: kill early in one
        victim.kill()
        return victim.pid

    with Background(kill_worker_1_while_generating) as fault:
        train(cfg, tmp_path)
    victim = fault.result

    rows = _all_steps(tmp_path, cfg.train.steps)
    died = rec.printed("rollout worker 1 died")
    assert len(died) == 1 and "issuing its 2 prompts again" in died[0][1], rec.lines
    assert rec.synced[-1]["pids"][1] != victim  # Ray restarted it in a new process ...
    _engines_hold_the_learners_weights(rec)  # ... which rejoined the group and took the current weights
    _each_draw_once_sync(rec, cfg)  # its two prompts were issued again and trained on once
    assert all(r["dropped/stale"] == 0 and r["buffer/lost"] == 0 for r in rows)
    assert all(r["logprob_gap"] < 1e-4 for r in rows)  # every trained group was sampled with the learners' weights


def _wait_blocked_in(procs: list[psutil.Process], method: str, idle_s: float, timeout_s: float) -> psutil.Process:
    """One of `procs` inside `method` that has used (almost) no CPU for idle_s: waiting, not working."""
    since: dict[int, tuple[float, float]] = {}

    def blocked() -> psutil.Process | None:
        now = time.monotonic()
        for p in procs:
            if not title(p).endswith(f".{method}"):
                since.pop(p.pid, None)
                continue
            cpu = cpu_seconds(p)
            if p.pid not in since or cpu - since[p.pid][0] > 0.05:
                since[p.pid] = (cpu, now)
            elif now - since[p.pid][1] >= idle_s:
                return p
        return None

    return wait_until(blocked, timeout_s, f"a process blocked in {method}()")


def test_reward_actor_killed_during_a_scoring_call_is_restarted_and_the_call_retried(ray_local, tmp_path, monkeypatch):
    cfg = make_cfg("train.steps=4", "sampling.max_new_tokens=64")
    rec = Recorder(monkeypatch)
    frozen_s = 1.0

    def kill_reward_actor_with_a_call_pending() -> tuple[int, int]:
        wait_until(lambda: last_step(tmp_path) >= 1, STARTUP_S, "step 1")
        [actor] = actor_processes("RewardActor")
        # Frozen first, so a rollout worker's score() call is certainly queued on it when it dies: the worker
        # then sits in rollout() without using CPU (generation is done, it waits for the scores).
        actor.send_signal(signal.SIGSTOP)
        try:
            workers = [psutil.Process(pid) for pid in rec.pids[0]["rollout"]]
            _wait_blocked_in(workers, "rollout", idle_s=frozen_s, timeout_s=120)
        finally:
            actor.kill()
        back = wait_until(lambda: [p for p in actor_processes("RewardActor") if p.pid != actor.pid], 120,
                          "the reward actor to be restarted")
        return actor.pid, back[0].pid

    with Background(kill_reward_actor_with_a_call_pending) as fault:
        train(cfg, tmp_path)
    old, new = fault.result

    rows = _all_steps(tmp_path, cfg.train.steps)
    assert new != old
    assert rec.printed("died") == []  # no rollout chunk was lost: the scoring call itself was retried
    assert max(r["time/reward"] for r in rows) >= frozen_s  # the call that waited out the freeze did finish
    _each_draw_once_sync(rec, cfg)
    assert all(r["dropped/duplicate"] == 0 for r in rows)


def test_learner_rank_killed_stops_with_a_resume_hint_and_resume_trains_each_draw_once(ray_local, tmp_path, monkeypatch):
    # asynchronous (rollout one version ahead): the checkpoint holds issued-but-untrained draws to re-issue
    cfg = make_cfg("train.steps=5", "train.save_every=1", "rollout.max_staleness=1", "sampling.max_new_tokens=64",
                   learner_ranks=2)
    rec = Recorder(monkeypatch)

    def kill_learner_rank_1_while_training() -> int:
        wait_until(lambda: last_step(tmp_path) >= 2, STARTUP_S, "step 2")
        rank1 = psutil.Process(rec.pids[0]["learner"][1])
        wait_busy_in(rank1, "train", cpu_s=0.05, timeout_s=120)
        rank1.kill()
        return rank1.pid

    with Background(kill_learner_rank_1_while_training), pytest.raises(RuntimeError) as err:
        train(cfg, tmp_path)
    ckpt_root = tmp_path / "checkpoints"
    tag, saved = read_checkpoint(ckpt_root)  # the newest finished checkpoint is intact ...
    msg = str(err.value)
    assert msg.startswith("learner rank 1 died during the optimizer step"), msg
    assert msg.endswith(f"its last finished checkpoint is {ckpt_root / tag}: continue with --resume"), msg
    assert saved.step >= 2 and tag == complete_tags(ckpt_root)[-1]
    assert (ckpt_root / tag / "hf" / "config.json").is_file()
    assert len(rec.runs[0].steps) in (saved.step, saved.step + 1)  # ... and no older than the step before the kill

    train(cfg, tmp_path, resume=True)
    _all_steps(tmp_path, cfg.train.steps)
    resumed = rec.runs[1]
    assert resumed.first == saved.step
    # what was trained up to the checkpoint, plus everything after resuming, covers each draw exactly once
    done, stale = rec.trained(upto={0: saved.step})
    check_each_draw_once(done, stale, rec.schedulers[-1], rec.job, cfg.train.seed)
    assert len(done) == cfg.train.steps * cfg.train.prompts_per_step
    after = {d for ranks in resumed.steps for r in ranks for d in r.draws + r.stale_draws}
    reissued = {d for d, _ in saved.data_order["reissue"]}
    assert reissued and reissued <= after  # the checkpoint's in-flight draws were issued again and done once


def _retry_logged(caplog) -> bool:
    return any(r.name == "stream.buffer" and ", retry " in r.getMessage() for r in caplog.records)


def test_redis_killed_and_restarted_mid_run_loses_no_pending_sample(ray_local, tmp_path, monkeypatch, caplog):
    cfg = make_cfg("train.steps=4", "redis.appendonly=true", "sampling.max_new_tokens=64")
    rec = Recorder(monkeypatch)
    caplog.set_level(logging.WARNING, logger="stream.buffer")

    def kill_and_restart_redis() -> int:
        wait_until(lambda: last_step(tmp_path) >= 1, STARTUP_S, "step 1")
        server = rec.job.redis_server
        with RolloutBuffer.from_config(cfg.redis, server.url) as probe:
            pending = wait_until(probe.pending, 120, "rollout groups taken by a learner and not yet acked")
            server.proc.kill()  # a crash, with groups pending on the learners
            server.proc.wait()
            # down until the driver has called Redis, failed and is backing off: the retry path is taken
            wait_until(lambda: _retry_logged(caplog), 60, "the driver retrying Redis while it is down")
            server.restart()  # from this thread, which stays alive until the run is over (see Background)
        return pending

    with Background(kill_and_restart_redis) as fault:
        train(cfg, tmp_path)
    pending_at_kill = fault.result

    rows = _all_steps(tmp_path, cfg.train.steps)
    assert pending_at_kill >= 1
    retried = [r.getMessage() for r in caplog.records if r.name == "stream.buffer"]
    assert retried and all(" failed (" in m and ", retry " in m for m in retried), retried  # the driver backed off
    assert all(r["buffer/lost"] == 0 and r["buffer/corrupt"] == 0 and r["dropped/duplicate"] == 0 for r in rows)
    assert rows[-1]["buffer/depth"] == 0 and rows[-1]["buffer/pending"] == 0
    _each_draw_once_sync(rec, cfg)


def test_stalled_weight_broadcast_names_the_engine_which_is_replaced(ray_local, tmp_path, monkeypatch):
    # 40 s: the replacement must be back within the timeout for the claim "replaced at version 2"; a restart
    # (imports, model load) took over 15 s with another test run beside it (CI's two workers)
    cfg = make_cfg("train.steps=4", "weight_sync.timeout_s=40", rollout_workers=2)
    rec = Recorder(monkeypatch, after_broadcast=True)
    frozen: dict = {}

    def freeze_engine_1(job, version: int) -> None:
        if version == 2 and not frozen:
            proc = psutil.Process(rec.pids[0]["rollout"][1])
            proc.send_signal(signal.SIGSTOP)  # its heartbeat thread stops with it
            frozen.update(proc=proc, t=time.monotonic())

    rec.before_broadcast = freeze_engine_1
    try:
        train(cfg, tmp_path)
    finally:
        if frozen and frozen["proc"].is_running():  # never leave a frozen process behind
            frozen["proc"].kill()

    _all_steps(tmp_path, cfg.train.steps)
    pid = frozen["proc"].pid
    failed = rec.printed("weight broadcast of version 2 failed (attempt 1/3)")
    assert len(failed) == 1 and f"rollout-1 (pid {pid})" in failed[0][1], rec.lines
    assert failed[0][0] - frozen["t"] < cfg.weight_sync.timeout_s
    # replaced after a few heartbeats, not after weight_sync.timeout_s: the failed broadcast named it silent
    killed = rec.printed("rollout worker 1 stopped its heartbeat during the broadcast and does not answer: killing")
    assert len(killed) == 1 and killed[0][0] - failed[0][0] < cfg.weight_sync.timeout_s / 2, rec.lines
    after = [s for s in rec.synced if s["version"] >= 2]
    assert after and all(s["pids"][1] != pid for s in after)  # replaced by a new process ...
    _engines_hold_the_learners_weights(rec)  # ... holding the learners' weights, from version 2 on
    _each_draw_once_sync(rec, cfg)
