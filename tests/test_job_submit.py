"""`ray job submit` against a real `ray start --head` cluster on 127.0.0.1 (see tests/job_cluster.py), and
which cluster `clsrl train` runs on when such a head runs on the machine.

One job is a probe (imports project packages from the uploaded working dir, schedules actors that import torch,
checks what was uploaded); the other is a short `clsrl train` run of the whole distributed loop. The tests
share one head cluster (a module fixture: one start and one teardown).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from commands.cli import DEFAULT_CONFIG
from tests.job_cluster import REPO, UPLOAD_EXCLUDES, head_cluster, job_runtime_env, submit_job

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("head_cluster")]  # one module-scoped head cluster

PROBE = r"""
import json, os, sys
import ray
import protocol.overrides, learner  # top-level packages of the uploaded working dir

@ray.remote(num_cpus=1)
class Probe:
    def info(self):
        import torch
        import protocol.overrides
        return {"pid": os.getpid(), "torch": torch.__version__, "schema": protocol.overrides.__file__, "cwd": os.getcwd(),
                "env": {k: os.environ.get(k) for k in ("CLSRL_CACHE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")}}

ray.init()
probes = [Probe.remote() for _ in range(2)]
infos = ray.get([p.info.remote() for p in probes], timeout=180)
print("CLSRL_PROBE " + json.dumps({
    "pid": os.getpid(), "cwd": os.getcwd(), "prefix": sys.prefix, "schema": protocol.overrides.__file__,
    "learner": learner.__file__, "gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources().get("CPU"),
    "present": {d: os.path.exists(d) for d in (".venv", ".cache", "runs", ".git", "cluster", "pyproject.toml")},
    "actors": infos}))
"""
ENTRYPOINT = ["python", "-c", PROBE]


def _probe(logs: str) -> dict:
    lines = [ln for ln in logs.splitlines() if ln.startswith("CLSRL_PROBE ")]
    assert lines, f"no probe output in the job's logs:\n{logs[-6000:]}"
    return json.loads(lines[-1].removeprefix("CLSRL_PROBE "))


def _leftovers(temp_dir: Path) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd, cwd = " ".join(p.info["cmdline"] or []), p.info["cwd"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(temp_dir) in cmd or cwd.startswith(str(temp_dir)):
            out.append(f"{p.pid} {cmd[:200]}")
    return out


def test_head_cluster_beside_in_process_ray(ray_local, tmp_path):
    """The head cluster neither joins nor disturbs the session's in-process cluster, and leaves nothing behind."""
    ray = ray_local
    ping = ray.remote(lambda: os.getpid())
    assert isinstance(ray.get(ping.remote(), timeout=60), int)
    local_cpus = ray.cluster_resources()["CPU"]
    with head_cluster(tmp_path, num_cpus=2) as head:
        code = "import ray; ray.init(); print('CPUS', ray.cluster_resources()['CPU'], ray.get_runtime_context().gcs_address)"
        status, logs = submit_job(head, ["python", "-c", code], job_runtime_env(), timeout_s=120, via="sdk")
        assert status == "SUCCEEDED", logs
        assert f"CPUS 2.0 {head.gcs_address}" in logs
        assert ray.cluster_resources()["CPU"] == local_cpus  # the head is not a node of the in-process cluster
        temp_dir = head.temp_dir
    assert not _leftovers(temp_dir), _leftovers(temp_dir)
    assert not temp_dir.exists()
    assert isinstance(ray.get(ping.remote(), timeout=60), int)  # the in-process cluster still serves


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with head_cluster(tmp_path_factory.mktemp("head"), num_cpus=6) as cluster:  # the demo plan needs 4.5
        yield cluster


def test_job_server_rejects_requests_without_token(head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=30)
    assert err.value.code == 401
    req = urllib.request.Request(f"{head.address}/api/jobs/", headers=head.headers)
    assert urllib.request.urlopen(req, timeout=30).status == 200


def test_job_submit_runs_project_actors(head):
    status, logs = submit_job(head, ENTRYPOINT, job_runtime_env(), timeout_s=240)  # `ray job submit` CLI
    assert status == "SUCCEEDED", logs[-6000:]
    probe = _probe(logs)

    # the job ran in the uploaded copy of the repo on this cluster, with the venv's python
    job_dir = probe["cwd"]
    assert job_dir.startswith(str(head.temp_dir)) and Path(job_dir).resolve() != REPO
    assert probe["gcs"] == head.gcs_address
    assert probe["prefix"] == sys.prefix
    assert probe["schema"].startswith(job_dir + os.sep) and probe["learner"].startswith(job_dir + os.sep)
    assert probe["present"] == {".venv": False, ".cache": False, "runs": False, ".git": False,
                                "cluster": True, "pyproject.toml": True}, UPLOAD_EXCLUDES

    # two actors in their own worker processes, importing torch and the uploaded packages, with the job's env
    actors = probe["actors"]
    assert len({a["pid"] for a in actors} | {probe["pid"]}) == 3
    for a in actors:
        assert a["torch"] and a["schema"].startswith(job_dir + os.sep) and a["cwd"] == job_dir
        assert a["env"] == {k: job_runtime_env()["env_vars"][k] for k in ("CLSRL_CACHE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")}
        assert os.path.isabs(a["env"]["CLSRL_CACHE"])


def test_job_submit_runs_clsrl_train(head, tmp_path):
    """The driver joins the cluster through RAY_ADDRESS and runs rollout, reward, learner actors and Redis there."""
    run_dir = tmp_path / "run"
    overrides = ["train.steps=2", "train.warm_start_steps=0", "train.prompts_per_step=4", "train.eval_every=0",
                 "data.eval_limit=4", "sampling.n=4", "learner.micro_batch_size=8", "train.loggers=[]",
                 "algorithm.dynamic_sampling=false",  # no warm start: no group with a signal to keep
                 "cluster.rollout_workers=1", "cluster.learner_ranks=1"]
    entry = ["python", "-m", "commands.cli", "train", "configs/cpu_demo.yaml", *overrides, "--run-dir", str(run_dir)]
    status, logs = submit_job(head, entry, job_runtime_env(), timeout_s=400)
    assert status == "SUCCEEDED", logs[-6000:]
    # the driver's startup line (cluster/job.py announce, placement.init_ray): it joined this head's GCS
    assert f"ray: joined {head.gcs_address}" in logs and "ray: local" not in logs, logs[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[-1]
    assert (run_dir / "checkpoints" / "step-000002" / "driver.json").is_file()


# one GRPO step, one engine and one learner rank (the plan needs 2.5 CPUs)
TINY = ["train.steps=1", "train.warm_start_steps=0", "train.prompts_per_step=2", "train.eval_every=0",
        "data.eval_limit=2", "sampling.n=2", "learner.micro_batch_size=4", "train.loggers=[]",
        "cluster.rollout_workers=1", "cluster.learner_ranks=1", "algorithm.dynamic_sampling=false"]


def _train(run_dir: Path, env: dict[str, str], *extra: str) -> str:
    """`clsrl train` in a subprocess; its `ray: ...` start-up line."""
    proc = subprocess.run([sys.executable, "-m", "commands.cli", "train", str(DEFAULT_CONFIG), *TINY, *extra,
                           "--run-dir", str(run_dir)], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ray: ")]
    assert len(lines) == 1, proc.stdout[-5000:]
    return lines[0]


def test_train_starts_its_own_cluster_beside_a_running_one_and_joins_it_when_told(head, tmp_path):
    """Ray was used on the machine before: a `ray start --head` runs and Ray's current-cluster file holds its
    address. Without cluster.address (or $RAY_ADDRESS) `clsrl train` starts a cluster of its own beside it;
    with cluster.address=auto it joins it. (A stale file pointing at a cluster that is gone:
    tests/test_placement.py::test_init_ray_starts_a_local_cluster_sized_for_the_plan.)"""
    ray_tmp = Path(tempfile.mkdtemp(prefix="clsrl-cur-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        # `ray start` recorded its address in its temp dir; put that file where ray.init() looks for it
        # (the default temp dir, here $RAY_TMPDIR/ray), as a plain `ray start --head` leaves it in /tmp/ray
        recorded = head.temp_dir / "ray_current_cluster"  # written a little after the job server is up
        deadline = time.monotonic() + 60
        while not recorded.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert recorded.read_text() == head.gcs_address
        (ray_tmp / "ray").mkdir()
        shutil.copy(recorded, ray_tmp / "ray" / "ray_current_cluster")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        env |= {k: v for k, v in head.env.items() if k.startswith("RAY_AUTH_")}  # the head's token
        env |= {"RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}

        jobs = len(head.client().list_jobs())  # the other tests' jobs on this head
        own = _train(tmp_path / "own", env)
        assert own.startswith("ray: local 127.0.0.1:") and "started for this run" in own, own
        assert head.gcs_address not in own
        assert len(head.client().list_jobs()) == jobs  # no driver of ours connected to the head

        joined = _train(tmp_path / "joined", env, "cluster.address=auto")
        assert joined == f"ray: joined {head.gcs_address} (cluster.address 'auto'; 6 CPUs on 1 node)"
        assert len(head.client().list_jobs()) == jobs + 1  # the head lists our driver as one more job
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
