"""Getting the learners' weights into every engine: form the broadcast group, broadcast a version (restarting
and re-joining engines that fail), or in colocated mode hand each engine its GPU's tensors as IPC handles."""
from __future__ import annotations

import logging
import time

import ray

from protocol.config import ExperimentConfig
from protocol.results import WeightUpdate
from telemetry.logs import announce


def form_weight_group(cfg: ExperimentConfig, learners: list, workers: list) -> None:
    """Learner rank 0 is the source (group rank 0); each tensor-parallel worker of an engine is a rank."""
    per = cfg.rollout.tensor_parallel_size
    n = per * len(workers)
    host, port = ray.get(learners[0].open_weight_group.remote(n, cfg.weight_sync))
    joining = [w.join_weight_group.remote(host, port, 1 + i * per, n, cfg.weight_sync)
               for i, w in enumerate(workers)]
    ray.get([learners[0].connect_weight_group.remote()] + joining)


def broadcast_weights(cfg: ExperimentConfig, learners: list, workers: list, version: int, rejoin: bool,
                      attempts: int) -> WeightUpdate:
    """Send the learners' weights to every engine; on a failure, restart the engines that do not answer,
    re-form the group and try again."""
    for attempt in range(1, attempts + 1):
        try:
            if rejoin:
                await_engines(cfg, workers)
                form_weight_group(cfg, learners, workers)
            sending = [a.broadcast.remote(version) for a in learners]
            receiving = [w.receive_weights.remote() for w in workers]
            update = ray.get(sending)[0]  # first: rank 0's error names the engine that failed, in time
            ray.get(receiving)
            return update
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
            if attempt == attempts:
                raise
            announce(f"weight broadcast of version {version} failed (attempt {attempt}/{attempts}): "
                     f"{str(err).splitlines()[-1][:500]}\nrestarting the engines that do not answer and "
                     f"re-forming the group", "clsrl.job", logging.WARNING)
            rejoin = True
    raise AssertionError("unreachable")


def share_colocated(learners: list, workers: list, version: int) -> WeightUpdate:
    """Colocated: learner rank i hands engine i (same GPU) IPC handles to its tensors; the engine wakes, maps
    and loads them. No retries: a colocated engine that dies takes its GPU's learner rank with it."""
    start = time.perf_counter()
    shared = ray.get([a.share_weights.remote() for a in learners])  # (handles, bytes) per rank
    try:
        loaded = ray.get([w.load_ipc.remote(handles, version) for w, (handles, _) in zip(workers, shared)])
    finally:
        ray.get([a.release_shared.remote() for a in learners])
    seconds = time.perf_counter() - start
    nbytes = shared[0][1]
    return WeightUpdate(version=version, bytes=nbytes, tensors=loaded[0], seconds=seconds,
                        mb_per_s=nbytes / 2**20 / max(seconds, 1e-9))


def await_engines(cfg: ExperimentConfig, workers: list) -> None:
    """Every rollout worker answers (Ray restarts dead ones); a stuck one is killed so Ray restarts it."""
    probes = {w.info.remote(): i for i, w in enumerate(workers)}
    _, stuck = ray.wait(list(probes), num_returns=len(probes), timeout=cfg.weight_sync.timeout_s)
    for ref in stuck:
        announce(f"rollout worker {probes[ref]} did not answer within weight_sync.timeout_s: killing it so "
                 f"Ray restarts it", "clsrl.job", logging.WARNING)
        ray.kill(workers[probes[ref]], no_restart=False)
    # While Ray restarts an actor, calls to it fail at once (ActorUnavailableError): ask until it is back.
    deadline = time.monotonic() + cfg.cluster.ready_timeout_s
    for i, w in enumerate(workers):
        while True:
            try:
                ray.get(w.info.remote(), timeout=max(deadline - time.monotonic(), 0.001))
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout worker {i} was not restarted within cluster.ready_timeout_s="
                                       f"{cfg.cluster.ready_timeout_s:.0f}s") from None
                time.sleep(0.2)
