"""cluster.placement: the bundle plan, reserving it on the session's real local Ray cluster, and failing clearly."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from cluster.placement import (
    ROLES,
    Placement,
    PlacementError,
    init_ray,
    plan_bundles,
    plan_totals,
    release,
    reserve,
)
from protocol.config import ClusterConfig
from tests.conftest import REPO

DEMO = ClusterConfig(rollout_workers=2, cpus_per_engine=1.0, learner_ranks=2, cpus_per_learner=1.0, reward_actors=1,
                     cpus_per_reward_actor=0.5, ready_timeout_s=30)


def _wait_cpu(ray, target: float, timeout: float = 10.0) -> float:
    """Available CPU once it equals target (reservations and removals are asynchronous), or what it is at the deadline."""
    deadline = time.monotonic() + timeout
    while abs((free := ray.available_resources().get("CPU", 0.0)) - target) > 1e-6 and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


def _group_states(ray, name: str) -> set[str]:
    return {g["state"] for g in ray.util.placement_group_table().values() if g["name"] == name}


def test_plan_bundles_order_and_contents_with_gpus():
    cluster = ClusterConfig(rollout_workers=2, cpus_per_engine=2, gpus_per_engine=1, learner_ranks=3, cpus_per_learner=1,
                            gpus_per_learner=0.5, reward_actors=1, cpus_per_reward_actor=0.25)
    assert plan_bundles(cluster) == [
        ("rollout", 0, {"CPU": 2.0, "GPU": 1.0}), ("rollout", 1, {"CPU": 2.0, "GPU": 1.0}),
        ("learner", 0, {"CPU": 1.0, "GPU": 0.5}), ("learner", 1, {"CPU": 1.0, "GPU": 0.5}),
        ("learner", 2, {"CPU": 1.0, "GPU": 0.5}),
        ("reward", 0, {"CPU": 0.25}),
    ]
    assert plan_totals(cluster) == {"CPU": 7.25, "GPU": 3.5}
    # CPU-only plans carry no GPU key; a GPU-only bundle carries no CPU key
    assert all("GPU" not in res for _, _, res in plan_bundles(DEMO))
    assert plan_bundles(replace(DEMO, cpus_per_engine=0, gpus_per_engine=1))[0] == ("rollout", 0, {"GPU": 1.0})


@pytest.mark.parametrize(("change", "key"), [
    ({"cpus_per_reward_actor": 0}, "cluster.cpus_per_reward_actor"),  # an empty bundle, which Ray rejects
    ({"cpus_per_learner": 0, "gpus_per_learner": 0}, "cluster.gpus_per_learner"),
    ({"gpus_per_engine": -1}, "cluster.gpus_per_engine"),
    ({"cpus_per_engine": float("nan")}, "cluster.cpus_per_engine"),
    ({"cpus_per_learner": "1"}, "cluster.cpus_per_learner"),
])
def test_plan_bundles_rejects_bad_amounts(change, key):
    cluster = replace(DEMO)
    for k, v in change.items():
        setattr(cluster, k, v)  # bypasses __post_init__, as a config edited in code would
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        plan_bundles(cluster)


def test_options_unknown_role_or_index_raises_key_error():
    placement = Placement(group=None, bundles=plan_bundles(DEMO))  # options() looks the bundle up before touching the group
    assert [placement.count(r) for r in ROLES] == [2, 2, 1]
    with pytest.raises(KeyError, match=r"'critic'.*rollout x2, learner x2, reward x1"):
        placement.options("critic", 0)
    with pytest.raises(KeyError, match=r"'reward', 1"):
        placement.options("reward", 1)


def test_init_ray_keeps_an_existing_session(ray_local):
    assert init_ray(replace(DEMO, address="10.255.255.1:6379")) == "existing"  # never tries the address
    assert ray_local.is_initialized()


def test_reserve_places_each_actor_in_its_bundle_and_release_frees_it(ray_local):
    ray = ray_local

    @ray.remote
    class Probe:
        def where(self) -> tuple[str | None, dict]:
            ctx = ray.get_runtime_context()
            return ctx.get_placement_group_id(), ctx.get_assigned_resources()

    before = _wait_cpu(ray, ray.cluster_resources()["CPU"])
    placement = reserve(DEMO, name="test-placement-demo")
    try:
        assert _wait_cpu(ray, before - 4.5) == pytest.approx(before - 4.5)  # reserved in full, before any actor starts
        probes = {(role, i): Probe.options(**placement.options(role, i)).remote() for role, i, _ in placement.bundles}
        seen = ray.get([a.where.remote() for a in probes.values()], timeout=60)
        for (role, i, res), (group_id, assigned) in zip(placement.bundles, seen):
            assert group_id == placement.group.id.hex(), (role, i)
            assert assigned == res, (role, i)
        assert placement.options("reward", 0)["num_cpus"] == 0.5 and placement.options("reward", 0)["num_gpus"] == 0.0
        assert placement.options("learner", 1)["scheduling_strategy"].placement_group_bundle_index == 3
        for actor in probes.values():
            ray.kill(actor)
    finally:
        release(placement)
    assert _wait_cpu(ray, before) == pytest.approx(before)
    assert _group_states(ray, "test-placement-demo") == {"REMOVED"}
    release(placement)  # a second release and None are no-ops
    release(None)


def test_impossible_gpu_plan_fails_fast_and_names_the_key(ray_local):
    ray = ray_local
    before = _wait_cpu(ray, ray.cluster_resources()["CPU"])
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        reserve(replace(DEMO, gpus_per_engine=1, ready_timeout_s=2), name="test-placement-gpu")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "GPU: plan needs 2, cluster has 0" in message
    assert "cluster.rollout_workers x cluster.gpus_per_engine = 2 x 1" in message
    assert "cluster.cpus_per_engine" not in message  # CPU is not what is short
    assert _group_states(ray, "test-placement-gpu") <= {"REMOVED"}
    assert _wait_cpu(ray, before) == pytest.approx(before)


def test_plan_blocked_by_another_reservation_times_out_and_is_removed(ray_local):
    ray = ray_local
    total = ray.cluster_resources()["CPU"]
    before = _wait_cpu(ray, total)
    # fits the cluster (so no early failure) but not next to the demo group: it must wait, then give up
    big = replace(DEMO, rollout_workers=int(total - 2.5), ready_timeout_s=1)
    assert before - 4.5 < plan_totals(big)["CPU"] <= total
    first = reserve(DEMO, name="test-placement-first")
    try:
        start = time.monotonic()
        with pytest.raises(PlacementError) as err:
            reserve(big, name="test-placement-blocked")
        assert 1 <= time.monotonic() - start < 10
        message = str(err.value)
        assert "not ready after" in message and "cluster.ready_timeout_s=1" in message
        assert f"available now: {{CPU: {before - 4.5:g}}}" in message
        assert "cluster.rollout_workers x cluster.cpus_per_engine" in message
        assert _group_states(ray, "test-placement-blocked") == {"REMOVED"}
    finally:
        release(first)
    assert _wait_cpu(ray, before) == pytest.approx(before)


def _run_driver(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


# a driver that imports only ray and cluster.placement (fast); ray is imported first, as a real entrypoint may do
_DRIVER = """
import json, sys, types
import ray
from cluster.placement import init_ray
print(init_ray(types.SimpleNamespace(**json.loads(sys.argv[1])), log_to_driver=False))
print(ray.cluster_resources()["CPU"], ray.nodes()[0]["NodeManagerAddress"])
"""


def test_init_ray_joins_ray_address(ray_local):
    address = ray_local.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(REPO))  # what `ray job submit` gives an entrypoint
    lines = _run_driver(_DRIVER.replace("sys.argv[1]", repr(json.dumps(asdict(DEMO)))), env)
    cpus = ray_local.cluster_resources()["CPU"]
    assert lines[0] == f"joined {address} (RAY_ADDRESS {address!r}; {cpus:g} CPUs on 1 node)"
    assert float(lines[1].split()[0]) == cpus


@pytest.mark.slow
def test_init_ray_starts_a_local_cluster_sized_for_the_plan(tmp_path_factory):
    """...whatever Ray's current-cluster file says: here it points at a cluster that is gone (a `ray start --head`
    ended without `ray stop`), which a plain ray.init() would try to join (and refuse, as num_cpus is given)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="clsrl-stale-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_dead_port()}")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        env |= {"PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)}
        big = replace(DEMO, rollout_workers=(os.cpu_count() or 1) + 3)  # plan CPU > cores: logical CPUs cover it
        code = _DRIVER.replace("sys.argv[1]", repr(json.dumps(asdict(big)))) + "ray.shutdown()\n"
        lines = _run_driver(code, env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    cpus = math.ceil(plan_totals(big)["CPU"])
    assert re.fullmatch(rf"local 127\.0\.0\.1:\d+ \({cpus} CPUs\), started for this run; .*", lines[0]), lines[0]
    assert lines[1] == f"{float(cpus)} 127.0.0.1"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_colocated_plan_merges_each_engine_into_its_learner_ranks_bundle():
    gpu = replace(DEMO, cpus_per_engine=1.0, gpus_per_engine=0.5, cpus_per_learner=2.0, gpus_per_learner=0.5)
    shared = {"CPU": 3.0, "GPU": 1.0}  # one whole GPU per pair: both actors get the same device
    assert plan_bundles(gpu, colocate=True) == [("learner", 0, shared), ("learner", 1, shared), ("reward", 0, {"CPU": 0.5})]
    placement = Placement(group=None, bundles=plan_bundles(gpu, colocate=True),
                          shares={"rollout": {"CPU": 1.0, "GPU": 0.5}, "learner": {"CPU": 2.0, "GPU": 0.5}})
    assert placement.count("rollout") == placement.count("learner") == 2
    for i in (0, 1):  # engine i is pinned to learner rank i's bundle, each asking for its own share of it
        engine, learner = placement.options("rollout", i), placement.options("learner", i)
        assert engine["scheduling_strategy"].placement_group_bundle_index == i
        assert learner["scheduling_strategy"].placement_group_bundle_index == i
        assert (engine["num_cpus"], engine["num_gpus"], learner["num_cpus"], learner["num_gpus"]) == (1.0, 0.5, 2.0, 0.5)
    assert placement.options("reward", 0)["scheduling_strategy"].placement_group_bundle_index == 2

