"""clsrl on a real multi-node Ray cluster: three nodes, each its own network namespace and address
(tests/netns_cluster.py), the hostname resolving to 127.0.0.1 as on a stock host, `ray job submit` to the
head, the default private Redis and no GLOO/NCCL interface set by hand.

Roles are placed by custom resources (cluster.role_resources), so the layout is known: learner rank 0, rollout
worker 0 and the reward actor on the head, learner rank 1 on n1 (the learners' gloo group spans two nodes),
rollout worker 1 alone on n2 (a rollout-only node).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from fault_kit import BASE
from netns_cluster import REPO, Node, available, netns_cluster

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available())),
              pytest.mark.xdist_group("netns")]  # one netns cluster at a time under pytest -n

STEPS = 10
PROMPTS = 4  # train.prompts_per_step in fault_kit.BASE
SLOTS = "cluster.role_resources={rollout: {rollout_slot: 1}, learner: {learner_slot: 1}, reward: {reward_slot: 1}}"
NODES = [Node("head", 4, {"learner_slot": 1, "rollout_slot": 1, "reward_slot": 1}),
         Node("n1", 1, {"learner_slot": 1}),
         Node("n2", 1, {"rollout_slot": 1})]


def submit(c, run_dir: Path, report: Path, *extra: str, wait: bool = True, log: Path | None = None,
           env_vars: dict[str, str] | None = None):
    """`ray job submit` from the head's namespace, as a user types it (working dir uploaded)."""
    env = json.dumps({"env_vars": {"CLSRL_CACHE": str(REPO / ".cache" / "clsrl"), "HF_HUB_OFFLINE": "1",
                                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                   **(env_vars or {})},
                      "excludes": ["/.venv", "/.cache", "/runs", "/.git", "__pycache__", "*.egg-info"]})
    argv = ["ray", "job", "submit", "--address", c.dashboard, "--working-dir", ".", "--runtime-env-json", env,
            "--", "python", "-m", "tests.multinode_job", str(report), "train", *BASE, SLOTS,
            f"train.steps={STEPS}", "train.save_every=2", *extra, "--run-dir", str(run_dir)]
    if wait:
        return c.sh("head", argv, timeout_s=600)
    return c.popen("head", argv, log)


def trained_draws(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "trained.jsonl").read_text().splitlines() if line.strip()]
    return [d for r in rows for d in r["draws"]]


def wait_for_step(run_dir: Path, step: int, proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and any(json.loads(x).get("step", -1) >= step for x in path.read_text().splitlines()
                                 if x.endswith("}")):
            return
        assert proc.poll() is None, "the job ended before the fault could be injected"
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached in {timeout_s}s")


def secrets_leaked(run_dir: Path, texts: list[str]) -> list[str]:
    """Where the private Redis password shows up in a log or in what the job printed."""
    conf = (run_dir / "redis" / "redis.conf").read_text()
    password = re.search(r"^requirepass (\S+)$", conf, re.M).group(1)
    assert len(password) >= 32  # 128 bits or more, hex
    found = [f"job output {i}" for i, t in enumerate(texts) if password in t]
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != "redis.conf" and path.suffix in (".log", ".out", ".err", ".txt", "") \
                and password in path.read_text(errors="replace"):
            found.append(str(path))
    return found


def test_rollout_node_lost_mid_run_costs_no_sample(tmp_path):
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    with netns_cluster(tmp_path, NODES) as c:
        start = time.time()
        job = submit(c, run_dir, report, wait=False, log=tmp_path / "job.out")
        wait_for_step(run_dir, 4, job, timeout_s=400)
        killed_at = time.time()
        assert c.kill_node("n2") > 0
        job.wait(timeout=400)
        out = (tmp_path / "job.out").read_text(errors="replace")
        assert job.returncode == 0, out[-4000:]
        elapsed = time.time() - start
        driver_log = (run_dir / "driver.log").read_text(errors="replace")
        seen = json.loads(report.read_text())
        redis_conf = (run_dir / "redis" / "redis.conf").read_text()
        leaks = secrets_leaked(run_dir, [out])
        for node in ("head", "n1", "n2"):
            leaks += [f"{node}: {p}" for p in subprocess.run(
                ["grep", "-rlF", re.search(r"requirepass (\S+)", redis_conf).group(1), str(c.temp / node)],
                capture_output=True, text=True).stdout.split()]
        ips = {name: c.ip(name) for name in ("head", "n1", "n2")}
    # actors on every node, as the roles' resources say
    assert seen["nodes"]["LearnerActor"] == sorted([ips["head"], ips["n1"]]), seen["nodes"]
    assert seen["nodes"]["RolloutWorker"] == sorted([ips["head"], ips["n2"]]), seen["nodes"]
    assert seen["nodes"]["RewardActor"] == [ips["head"]], seen["nodes"]
    # the private Redis listened where n1's learner and n2's engine reach it, behind its password
    assert f"bind 127.0.0.1 {ips['head']}" in redis_conf
    assert not leaks, f"the Redis password appears in {leaks}"
    # engines bit-equal to learner rank 0 after every broadcast; both engines before the loss, one after
    before = [b for b in seen["broadcasts"] if b["time"] < killed_at]
    after = [b for b in seen["broadcasts"] if b["time"] > killed_at]
    assert before and all(b["engines"] == [0, 1] and all(b["equal"]) for b in before), before
    assert after and all(all(b["equal"]) for b in after), after
    assert after[-1]["engines"] == [0] and after[-1]["version"] == STEPS, after[-1]
    # every draw trained exactly once, none skipped: draws 0 .. STEPS * PROMPTS - 1
    draws = trained_draws(run_dir)
    assert not [d for d, n in Counter(draws).items() if n > 1], draws
    assert sorted(draws) == list(range(STEPS * PROMPTS))
    reissued = re.findall(r"issuing its (\d+) prompts again", driver_log)
    resumed = [b["time"] for b in after][0] - killed_at
    print(f"\n[multinode] {STEPS} steps in {elapsed:.0f}s; n2 killed after step 4; first broadcast without it "
          f"{resumed:.1f}s later; prompts re-issued: {reissued}")


def test_learner_node_lost_stops_with_the_named_error_and_resume_continues(tmp_path):
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    with netns_cluster(tmp_path, NODES) as c:
        job = submit(c, run_dir, report, wait=False, log=tmp_path / "job.out")
        wait_for_step(run_dir, 3, job, timeout_s=400)
        c.kill_node("n1")
        job.wait(timeout=400)
        out = (tmp_path / "job.out").read_text(errors="replace")
        assert job.returncode != 0, out[-3000:]
        # n1 may die in any call the learners make together: the step, a checkpoint save, a broadcast
        during = "(the optimizer step|the checkpoint save|the weight broadcast)"
        assert re.search(rf"learner rank 1 died during {during} .*continue with --resume", out), out[-3000:]
        stopped_at = max(json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                         if x.endswith("}"))
        # resume on the nodes left: learners no longer ask for learner_slot (the head has one), so both
        # pack onto the head's CPUs
        resumed = submit(c, run_dir, report, "--resume",
                         "cluster.role_resources={rollout: {rollout_slot: 1}, reward: {reward_slot: 1}}")
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    seen = json.loads(report.read_text())
    assert seen["nodes"]["LearnerActor"] == [c.ip("head")] * 2, seen["nodes"]
    assert all(all(b["equal"]) for b in seen["broadcasts"])
    assert stopped_at < STEPS
    # the steps after the checkpoint are trained again after the resume, and recorded once
    draws = trained_draws(run_dir)
    assert not [d for d, n in Counter(draws).items() if n > 1], draws
    assert sorted(draws) == list(range(STEPS * PROMPTS))


def test_a_rendezvous_that_cannot_complete_fails_in_time_naming_ranks_nodes_and_interfaces(tmp_path):
    # what gloo does on its own when the hostname resolves to 127.0.0.1, forced here by the user's variable:
    # each rank advertises 127.0.0.1, which the other node cannot reach
    nodes = [Node("head", 4, {"learner_slot": 1, "rollout_slot": 2, "reward_slot": 1}),
             Node("n1", 1, {"learner_slot": 1})]
    with netns_cluster(tmp_path, nodes) as c:
        res = submit(c, tmp_path / "run", tmp_path / "report.json", "cluster.rendezvous_timeout_s=20",
                     env_vars={"GLOO_SOCKET_IFNAME": "lo"})
        head, n1 = c.ip("head"), c.ip("n1")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    line = next((x for x in out.splitlines() if x.startswith("clsrl: error: the learners' process group")), None)
    assert line, out[-4000:]
    # gloo gives up on the refused address (or our bound does): either way within the bound, and named
    assert "remote=[127.0.0.1]" in line or "after cluster.rendezvous_timeout_s=20s" in line, line
    assert f"rank 0 on node {head} (interface lo, from GLOO_SOCKET_IFNAME (set by the user))" in line
    assert f"rank 1 on node {n1} (interface lo" in line


def test_a_node_that_cannot_see_the_model_fails_the_run_before_step_1_naming_node_path_and_fix(tmp_path):
    cache = REPO / ".cache" / "clsrl"  # model.path (the tiny model) lives here; n1 sees it empty
    nodes = [Node("head", 4, {"learner_slot": 1, "rollout_slot": 2, "reward_slot": 1}),
             Node("n1", 1, {"learner_slot": 1}, hide=[str(cache)])]
    run_dir = tmp_path / "run"
    with netns_cluster(tmp_path, nodes) as c:
        res = submit(c, run_dir, tmp_path / "report.json")
        n1 = c.ip("n1")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    line = next((x for x in out.splitlines() if x.startswith("clsrl: error: storage every node")), None)
    assert line, out[-4000:]
    assert re.search(rf"node {re.escape(n1)} \(\S+\): model\.path {re.escape(str(cache))}/\S+ does not exist", line)
    assert c.ip("head") not in line  # the head sees it all
    assert "a file system every node mounts" in line
    assert not (run_dir / "metrics.jsonl").exists()  # before step 0's eval, let alone step 1
