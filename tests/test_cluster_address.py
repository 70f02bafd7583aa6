"""Which Ray cluster `clsrl train` runs on when Ray was used on the machine before: a `ray start --head` still
running, whose address Ray's current-cluster file holds. Without cluster.address (or $RAY_ADDRESS) the run starts
a cluster of its own beside it; with cluster.address=auto it joins it. (A stale file pointing at a cluster that
is gone: tests/test_placement.py::test_init_ray_starts_a_local_cluster_sized_for_the_plan.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from commands.cli import DEFAULT_CONFIG
from tests.job_cluster import REPO, head_cluster

pytestmark = pytest.mark.slow

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


def test_train_starts_its_own_cluster_beside_a_running_one_and_joins_it_when_told(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="clsrl-cur-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        with head_cluster(tmp_path / "head", num_cpus=3) as head:
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

            own = _train(tmp_path / "own", env)
            assert own.startswith("ray: local 127.0.0.1:") and "started for this run" in own, own
            assert head.gcs_address not in own
            assert len(head.client().list_jobs()) == 0  # no driver of ours connected to the head

            joined = _train(tmp_path / "joined", env, "cluster.address=auto")
            assert joined == f"ray: joined {head.gcs_address} (cluster.address 'auto'; 3 CPUs on 1 node)"
            assert len(head.client().list_jobs()) == 1  # the head lists our driver as its one job
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
