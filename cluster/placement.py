"""The resource plan made real: one Ray placement group, a bundle per actor (rollout engines, learner ranks,
reward actors).

Reserving it all up front means a run gets all its actors or fails early saying what to lower, not half of
them pending forever.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# ray is imported lazily: its import freezes RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (see init_ray)
if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from protocol.config import ClusterConfig

Bundle = tuple[str, int, dict[str, float]]


class PlacementError(RuntimeError):
    """The cluster cannot hold the plan; the message names what the plan needs and what the cluster has."""


ROLES = ("rollout", "learner", "reward")
# role -> (count key, {resource: per-actor key}); rewards are CPU-only actors
_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "rollout": ("rollout_workers", {"CPU": "cpus_per_engine", "GPU": "gpus_per_engine"}),
    "learner": ("learner_ranks", {"CPU": "cpus_per_learner", "GPU": "gpus_per_learner"}),
    "reward": ("reward_actors", {"CPU": "cpus_per_reward_actor"}),
}


def _number(cluster: ClusterConfig, key: str) -> float:
    value = getattr(cluster, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"cluster.{key} must be a non-negative number, got {value!r}")
    return float(value)


def _role_resources(cluster: ClusterConfig, role: str) -> dict[str, float]:
    """cluster.role_resources[role]: custom Ray resources that pin a role to the nodes that offer them."""
    extra = cluster.role_resources or {}
    unknown = sorted(set(extra) - set(ROLES))
    if unknown:
        raise ValueError(f"cluster.role_resources: unknown role(s) {unknown}; roles are {list(ROLES)}")
    own = extra.get(role) or {}
    for name, amount in own.items():
        if name in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, int | float) \
                or not amount > 0:
            raise ValueError(f"cluster.role_resources.{role}.{name} must be a custom resource with an amount "
                             f"> 0, got {amount!r} (CPU/GPU have keys of their own)")
    return {name: float(amount) for name, amount in own.items()}


def plan_bundles(cluster: ClusterConfig, colocate: bool = False) -> list[Bundle]:
    """One bundle per actor, in role order, as (role, index, {"CPU": c[, "GPU": g]}). Pure: no Ray needed.

    `colocate` (rollout.colocate): engine i shares learner rank i's bundle, which holds both actors'
    resources, so with gpus_per_learner = gpus_per_engine = 0.5 the two land on the same GPU (see
    `actor_shares`)."""
    bundles: list[Bundle] = []
    for role in ROLES:
        count_key, res_keys = _KEYS[role]
        count = getattr(cluster, count_key)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"cluster.{count_key} must be an integer >= 1, got {count!r}")
        res = {name: _number(cluster, key) for name, key in res_keys.items()}
        if not any(res.values()):  # Ray rejects bundles whose resources are all zero
            keys = " = ".join(f"cluster.{k}" for k in res_keys.values())
            raise ValueError(f"each {role} actor needs some CPU or GPU: {keys} = 0")
        res = {name: amount for name, amount in res.items() if amount > 0}
        res.update(_role_resources(cluster, role))
        bundles += [(role, i, dict(res)) for i in range(count)]
    if colocate:
        engines = {i: res for r, i, res in bundles if r == "rollout"}
        bundles = [(r, i, {k: res.get(k, 0.0) + engines.get(i, {}).get(k, 0.0)
                           for k in {*res, *engines.get(i, {})}})
                   if r == "learner" else (r, i, res) for r, i, res in bundles if r != "rollout"]
    return bundles


def actor_shares(cluster: ClusterConfig) -> dict[str, dict[str, float]]:
    """Colocated: what each of the two actors in a shared bundle asks for ({role: {resource: amount}})."""
    return {role: {name: _number(cluster, key) for name, key in _KEYS[role][1].items()}
            for role in ("rollout", "learner")}


def _sum(bundles: list[Bundle]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for _, _, res in bundles:
        for name, amount in res.items():
            totals[name] = totals.get(name, 0.0) + amount
    return totals


def plan_totals(cluster: ClusterConfig) -> dict[str, float]:
    return _sum(plan_bundles(cluster))


def _visible_gpus() -> int:
    try:
        import torch  # honours CUDA_VISIBLE_DEVICES; counts via NVML without initialising CUDA
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_ray(cluster: ClusterConfig, runtime_env: dict | None = None, log_to_driver: bool = True) -> str:
    """Connect this driver to Ray and say to which cluster: the configured address (`auto`: the one
    `ray start` recorded on this machine), else $RAY_ADDRESS (set by `ray job submit`), else a new local
    cluster of the run's own, whatever else runs on the machine (Ray's address "local": neither a running
    `ray start --head` nor a stale address in Ray's current-cluster file is joined).

    `runtime_env` is for a local cluster we start; on a joined one, the code and env come from
    `ray job submit`.
    """
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return "existing"
    source = "cluster.address" if cluster.address else "RAY_ADDRESS"
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    # the job's runtime_env (working dir, env vars from `ray job submit`) applies; ours would conflict with it
    if address and address != "local":
        ray.init(address=address, log_to_driver=log_to_driver)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return (f"joined {ray.get_runtime_context().gcs_address} ({source} {address!r}; "
                f"{ray.cluster_resources().get('CPU', 0):g} CPUs on {nodes} node{'s' * (nodes != 1)})")
    # loopback only for a local cluster; inherited by GCS/raylet
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # ray read it at import; it may have been imported before
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False
    # logical CPUs: our actors mostly wait on each other, so the plan may ask for more than there are cores
    num_cpus = max(os.cpu_count() or 1, math.ceil(plan_totals(cluster).get("CPU", 0.0)))
    ray.init(address="local", num_cpus=num_cpus, num_gpus=_visible_gpus(), include_dashboard=False,
             runtime_env=runtime_env, log_to_driver=log_to_driver)
    return (f"local {ray.get_runtime_context().gcs_address} ({num_cpus} CPUs), started for this run; "
            f"cluster.address=auto would join the one `ray start` runs")


@dataclass
class Placement:
    group: PlacementGroup
    bundles: list[Bundle]
    shares: dict[str, dict[str, float]] | None = None  # colocated: engines live in the learners' bundles

    def _index(self, role: str, index: int) -> int:
        if self.shares and role == "rollout":
            role = "learner"
        for i, (r, j, _) in enumerate(self.bundles):
            if r == role and j == index:
                return i
        plan = ", ".join(f"{r} x{self.count(r)}" for r in ROLES if self.count(r))
        raise KeyError(f"no bundle for ({role!r}, {index}) in the plan ({plan})")

    def options(self, role: str, index: int) -> dict[str, Any]:
        """kwargs for ActorClass.options(**...): the bundle's resources, pinned to that bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        i = self._index(role, index)
        res = self.shares[role] if self.shares and role in self.shares else self.bundles[i][2]
        return {
            "num_cpus": res.get("CPU", 0.0),
            "num_gpus": res.get("GPU", 0.0),
            # tasks an actor starts are not squeezed into its bundle (they would compete for its resources)
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=i,
                placement_group_capture_child_tasks=False),
        }

    def count(self, role: str) -> int:
        if self.shares and role == "rollout":
            role = "learner"
        return sum(1 for r, _, _ in self.bundles if r == role)


def _fmt(res: dict[str, float]) -> str:
    """CPU, GPU and custom resources; per-node markers, memory and placement-group internals are noise
    here."""
    noise = ("node:", "memory", "object_store_memory", "accelerator_type:")
    shown = (f"{k}: {v:g}" for k, v in sorted(res.items()) if not k.startswith(noise) and "_group_" not in k)
    return "{" + ", ".join(shown) + "}"


def _fits(node: dict[str, float], res: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in res.items())


def _owns_head() -> bool:
    """True when this driver started the cluster itself (ray.init without an address): no autoscaler can add
    nodes."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.is_head())


def _never_fits(bundles: list[Bundle], strategy: str) -> list[str]:
    """Why the plan cannot fit the nodes there are now, however long we wait (empty when it might)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    totals = _sum(bundles)
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in totals}
    reasons = [f"{k}: plan needs {v:g}, cluster has {have[k]:g}"
               for k, v in totals.items() if v > have[k] + 1e-9]
    stuck = next(((r, i, res) for r, i, res in bundles if not any(_fits(n, res) for n in nodes)), None)
    if stuck and not reasons:
        reasons.append(f"no node can hold bundle {stuck[0]} {stuck[1]} {_fmt(stuck[2])}")
    if strategy == "STRICT_PACK" and not any(_fits(n, totals) for n in nodes):
        reasons.append(f"STRICT_PACK needs one node with {_fmt(totals)}")
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        reasons.append(f"STRICT_SPREAD needs {len(bundles)} nodes, cluster has {len(nodes)}")
    return reasons


def _lower_hint(cluster: ClusterConfig, resources: list[str]) -> str:
    terms = []
    for role in ROLES:
        count_key, res_keys = _KEYS[role]
        for name in resources:
            if name in res_keys and getattr(cluster, res_keys[name]) > 0:
                terms.append(f"cluster.{count_key} x cluster.{res_keys[name]} = "
                             f"{getattr(cluster, count_key)} x {getattr(cluster, res_keys[name]):g}")
    return "lower " + "; ".join(terms) if terms else "lower the per-actor resources"


def _error(cluster: ClusterConfig, headline: str, reasons: list[str]) -> PlacementError:
    import ray

    totals = plan_totals(cluster)
    have, free = ray.cluster_resources(), ray.available_resources()
    short = [k for k, v in totals.items() if v > free.get(k, 0.0) + 1e-9] or list(totals)
    lines = [headline, *(f"  {r}" for r in reasons),
             f"  plan totals: {_fmt(totals)} ({len(plan_bundles(cluster))} bundles, "
             f"strategy {cluster.strategy})",
             f"  cluster resources: {_fmt(have)}", f"  available now: {_fmt(free)}",
             f"  to fit, {_lower_hint(cluster, short)} (or add nodes / free resources held by other jobs)"]
    return PlacementError("\n".join(lines))


def reserve(cluster: ClusterConfig, name: str | None = None, colocate: bool = False) -> Placement:
    """Reserve a bundle per actor; returns once all are placed, else raises PlacementError saying what to
    lower."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = plan_bundles(cluster, colocate)
    # a cluster we started cannot grow, so an impossible plan fails now instead of after the timeout
    if _owns_head():
        reasons = _never_fits(bundles, cluster.strategy)
        if reasons:
            raise _error(cluster, "placement group can never be scheduled on this local cluster:", reasons)
    group = placement_group([res for _, _, res in bundles], strategy=cluster.strategy, name=name or "")
    start = time.monotonic()
    ready, _ = ray.wait([group.ready()], timeout=cluster.ready_timeout_s)
    if not ready:
        remove_placement_group(group)  # a pending group would grab resources as they free up
        waited = time.monotonic() - start
        raise _error(cluster, f"placement group not ready after {waited:.1f}s "
                              f"(cluster.ready_timeout_s={cluster.ready_timeout_s:g}):",
                     _never_fits(bundles, cluster.strategy))
    return Placement(group, bundles, actor_shares(cluster) if colocate else None)


def release(placement: Placement | None) -> None:
    """Give the reservation back (its actors should be killed first); a no-op for None or an already removed
    group."""
    import ray
    from ray.util.placement_group import remove_placement_group

    if placement is None or not ray.is_initialized():
        return
    try:
        remove_placement_group(placement.group)
    except Exception:  # already removed (Ray raises when the group is gone)
        pass
