"""`ray job submit` against a real `ray start --head` cluster on 127.0.0.1 (see tests/job_cluster.py).

One job is a probe (imports project packages from the uploaded working dir, schedules actors that import torch,
checks what was uploaded); the other is a short `clsrl train` run of the whole distributed loop.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

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
