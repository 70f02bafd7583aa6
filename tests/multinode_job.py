"""The entrypoint the multi-node tests submit with `ray job submit`: the real `clsrl train`, observed.

    python tests/multinode_job.py REPORT.json train CONFIG key=value ... --run-dir DIR

Runs commands.cli.main unchanged; around Job.broadcast (which it calls through) it records, after every
broadcast, which engines are in the group and whether each holds learner rank 0's weights bit for bit (a
SHA-256 per parameter), plus the node every actor landed on. The report is rewritten after each broadcast,
so a run that dies still leaves what it saw.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray

from cluster.job import Job
from commands.cli import main


def actor_nodes() -> dict[str, list[str]]:
    """Class name -> the node IPs of its alive actors."""
    from ray.util.state import list_actors

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    out: dict[str, list[str]] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        out.setdefault(a.class_name, []).append(ips.get(a.node_id, a.node_id))
    return {k: sorted(v) for k, v in out.items()}


def observe(report: Path) -> None:
    seen: dict = {"broadcasts": [], "nodes": {}}
    real = Job.broadcast

    def broadcast(self, version: int, *args, **kwargs):
        update = real(self, version, *args, **kwargs)
        learner = ray.get(self.learners[0].checksums.remote())
        members, equal, lost = [], [], []
        for i in (i for i in range(len(self.rollout_workers)) if i not in self.absent):
            try:
                equal.append(ray.get(self.rollout_workers[i].checksums.remote()) == learner)
                members.append(i)
            except ray.exceptions.RayActorError:  # its node died after this broadcast: the next leaves it out
                lost.append(i)
        seen["broadcasts"].append({"version": version, "time": time.time(), "engines": members,
                                   "equal": equal, "lost": lost, "params": len(learner)})
        if not seen["nodes"]:
            seen["nodes"] = actor_nodes()
        report.write_text(json.dumps(seen))
        return update

    Job.broadcast = broadcast


if __name__ == "__main__":
    out = Path(sys.argv[1])
    observe(out)
    sys.exit(main(sys.argv[2:]))
