"""What a run needs from the nodes it spans: where the private Redis listens, the learners' process group
formed within a bound, and storage every node hosting an actor can read (and, for learners, write).

On one node all of this is loopback and one file system; on several, each is a way the run could otherwise
fail late (a gloo rendezvous that times out after minutes, a learner that cannot reach Redis, a checkpoint
written where the driver never looks), so each is checked up front and fails with one message that names
the node, the address or the path.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import ray

from cluster.placement import PlacementError
from protocol.components import RedisConfig
from stream.server import LOOPBACK


class NodeError(PlacementError):
    """A node cannot take part as the run needs (storage it cannot see, a group it cannot join): a user
    error, reported as one `clsrl: error:` line."""


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def redis_host(cfg: RedisConfig) -> str:
    """Where the private Redis listens (besides loopback): the driver node's cluster IP when actors may land
    on another node (more than one alive node, or redis.listen: cluster), else loopback only."""
    if cfg.listen == "loopback" or (cfg.listen == "auto" and len(alive_nodes()) <= 1):
        return LOOPBACK
    return ray.util.get_node_ip_address()


def form_learner_group(learners: list, timeout_s: float, collective_timeout_s: float) -> tuple[str, int]:
    """Bind every rank's collectives to its node's interface, then form the learners' group; a rendezvous
    that does not complete within `timeout_s` fails naming the ranks, their nodes and interfaces."""
    nets = ray.get([a.network.remote() for a in learners])
    addr, port = ray.get(learners[0].address.remote())
    calls = {a.rendezvous.remote(addr, port, collective_timeout_s): r for r, a in enumerate(learners)}
    ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
    failed = {}
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:  # gloo/NCCL gave up first (e.g. a peer's address refused)
            failed[calls[ref]] = str(err).strip().splitlines()[-1][:400]
    if late or failed:
        why = [f"rank {r} failed: {msg}" for r, msg in sorted(failed.items())]
        if late:
            why.append(f"rank(s) {sorted(calls[ref] for ref in late)} still waiting after "
                       f"cluster.rendezvous_timeout_s={timeout_s:g}s")
        where = "; ".join(f"rank {n['rank']} on node {n['node']} (interface {n['interface']}, from "
                          f"{n['source']})" for n in nets)
        raise NodeError(f"the learners' process group at {addr}:{port} did not form: {'; '.join(why)}. "
                        f"Ranks: {where}. Check that these nodes reach each other on those interfaces "
                        f"(firewall, routes), or set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME")
    return addr, port


# ---- storage ----

def _probe(paths: dict[str, tuple[str, bool]]) -> dict:
    """On one node: each path's problem, if any. paths: label -> (path, must be writable)."""
    problems = {}
    for label, (path, writable) in paths.items():
        p = Path(path)
        try:
            if not p.exists():
                problems[label] = f"{path} does not exist"
            elif not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
                problems[label] = f"{path} is not readable"
            elif writable:
                probe = p / f".clsrl-write-check-{socket.gethostname()}-{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
        except OSError as err:
            problems[label] = f"{path}: {err.strerror or err}"
    return {"node": ray.util.get_node_ip_address(), "host": socket.gethostname(), "problems": problems}


def check_storage(bundle_nodes: dict[str, set[str]], readable: dict[str, str], writable: dict[str, str],
                  timeout_s: float) -> None:
    """Every node that hosts an actor sees `readable` (label -> path); learner nodes may also write
    `writable`. bundle_nodes: role -> node ids. One task per node, pinned there; one error for them all."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    calls = {}
    for node in set().union(*bundle_nodes.values()) if bundle_nodes else set():
        need = {label: (path, False) for label, path in readable.items() if path}
        if node in bundle_nodes.get("learner", ()):
            need.update({label: (path, True) for label, path in writable.items() if path})
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        calls[probe.options(scheduling_strategy=strategy).remote(need)] = node
    deadline = time.monotonic() + timeout_s
    ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=max(deadline - time.monotonic(), 1))
    lines = []
    for found in ray.get(ready):
        lines += [f"node {found['node']} ({found['host']}): {label} {why}"
                  for label, why in sorted(found["problems"].items())]
    lines += [f"node {calls[ref]}: the storage check did not finish within {timeout_s:g}s" for ref in late]
    if lines:
        raise NodeError("storage every node must see is missing: " + "; ".join(lines) + ". Put model.path, "
                        "the run directory and $CLSRL_CACHE on a file system every node mounts at the same "
                        "path (NFS, a shared volume), or copy model.path to that path on every node")


def placement_nodes(group, bundles: list) -> dict[str, set[str]]:
    """role -> the node ids its bundles were placed on."""
    table = ray.util.placement_group_table(group)
    by_index = table.get("bundles_to_node_id", {})
    out: dict[str, set[str]] = {}
    for i, (role, _, _) in enumerate(bundles):
        if by_index.get(i):
            out.setdefault(role, set()).add(by_index[i])
    return out
