"""Getting the learners' weights into every engine: form the broadcast group, broadcast a version (restarting
and re-joining engines that fail), or in colocated mode hand each engine its GPU's tensors as IPC handles."""
from __future__ import annotations

import logging
import time

import ray

from protocol.config import ExperimentConfig
from protocol.results import WeightUpdate
from telemetry.logs import announce


def form_weight_group(cfg: ExperimentConfig, learners: list, workers: list,
                      members: list[int] | None = None) -> None:
    """Learner rank 0 is the source (group rank 0); each tensor-parallel worker of an engine is a rank.
    `members`: the engines (indices into `workers`) in the group, default all."""
    per = cfg.rollout.tensor_parallel_size
    members = list(range(len(workers))) if members is None else members
    n = per * len(members)
    host, port = ray.get(learners[0].open_weight_group.remote(n, cfg.weight_sync))
    joining = [workers[w].join_weight_group.remote(host, port, 1 + i * per, n, cfg.weight_sync)
               for i, w in enumerate(members)]
    ray.get([learners[0].connect_weight_group.remote()] + joining)


def broadcast_weights(cfg: ExperimentConfig, learners: list, workers: list, version: int, rejoin: bool,
                      attempts: int, absent: set[int] | None = None,
                      formed: dict[int, int] | None = None) -> tuple[WeightUpdate, set[int]]:
    """Send the learners' weights to every engine that answers; on a failure, restart the engines that do
    not answer, re-form the group without the ones still gone, and try again. Returns the update and the
    engines left out (their node is gone and nothing replaced it yet; `absent` = those left out last time,
    probed briefly, so a lost node does not cost every step a wait). `formed`: engine -> pid of the group's
    members, kept by the caller: the group is re-formed only when they change (or after a failure)."""
    absent = set(absent or ())
    formed = {} if formed is None else formed
    members = [i for i in range(len(workers)) if i not in absent]
    force, silent = False, set()
    for attempt in range(1, attempts + 1):
        try:
            if rejoin:
                live = await_engines(cfg, workers, absent, silent)
                members = sorted(live)
                if force or live != formed:
                    formed.clear()
                    form_weight_group(cfg, learners, workers, members)
                    formed.update(live)
            sending = [a.broadcast.remote(version) for a in learners]
            receiving = [workers[i].receive_weights.remote() for i in members]
            update = ray.get(sending)[0]  # first: rank 0's error names the engine that failed, in time
            ray.get(receiving)
            return update, set(range(len(workers))) - set(members)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
            if attempt == attempts:
                raise
            announce(f"weight broadcast of version {version} failed (attempt {attempt}/{attempts}): "
                     f"{str(err).splitlines()[-1][:500]}\nrestarting the engines that do not answer and "
                     f"re-forming the group", "clsrl.job", logging.WARNING)
            rejoin = force = True
            silent = silent_engines(err, members, cfg.rollout.tensor_parallel_size)
    raise AssertionError("unreachable")


def silent_engines(err: Exception, members: list[int], per_engine: int) -> set[int]:
    """The engines (indices into the workers) whose heartbeat the failed broadcast saw stop: group rank r
    is tensor-parallel worker (r - 1) % per_engine of members[(r - 1) // per_engine]."""
    ranks = getattr(getattr(err, "cause", None), "silent_ranks", ())
    return {members[(r - 1) // per_engine] for r in ranks if 0 < r <= len(members) * per_engine}


def _kill_unanswering(workers: list, probes: dict, timeout_s: float, why: str) -> None:
    """Kill (for Ray to restart) the engines whose probe ({ref: index}) is not answered within timeout_s."""
    _, stuck = ray.wait(list(probes), num_returns=len(probes), timeout=timeout_s) if probes else ([], [])
    for ref in stuck:
        announce(f"rollout worker {probes[ref]} {why}: killing it so Ray restarts it", "clsrl.job",
                 logging.WARNING)
        ray.kill(workers[probes[ref]], no_restart=False)


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


def await_engines(cfg: ExperimentConfig, workers: list, absent: set[int] = frozenset(),
                  silent: set[int] = frozenset()) -> dict[int, int]:
    """The engines that answer, as {index: pid} (Ray restarts dead ones). A stuck one is killed so Ray
    restarts it: after a few heartbeats (weight_sync.stale_s) for the `silent` ones, whose heartbeat the
    failed broadcast saw stop, after weight_sync.timeout_s for the others. One that is not back within
    weight_sync.timeout_s (its node died and no capacity replaced it; `absent` ones get one short probe) is
    left out, and rejoins at a later broadcast once Ray has placed it again. Raises when no engine is left."""
    probes = {w.info.remote(): i for i, w in enumerate(workers) if i not in absent}
    # silent and not answering for a few heartbeats: frozen (a dead engine fails the call at once)
    sync = cfg.weight_sync
    _kill_unanswering(workers, {r: i for r, i in probes.items() if i in silent}, sync.stale_s,
                      "stopped its heartbeat during the broadcast and does not answer")
    _kill_unanswering(workers, {r: i for r, i in probes.items() if i not in silent}, sync.timeout_s,
                      "did not answer within weight_sync.timeout_s")
    # While Ray restarts an actor, calls to it fail at once (ActorUnavailableError): ask until it is back.
    deadline = time.monotonic() + cfg.weight_sync.timeout_s
    live: dict[int, int] = {}
    gone = []
    for i, w in enumerate(workers):
        until = time.monotonic() + 1.0 if i in absent else deadline
        while True:
            try:
                live[i] = ray.get(w.info.remote(), timeout=max(until - time.monotonic(), 0.001))["pid"]
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.RayActorError):
                if time.monotonic() > until:
                    gone.append(i)
                    break
                time.sleep(0.2)
    if gone and set(gone) != set(absent):
        announce(f"rollout worker(s) {gone} not back within weight_sync.timeout_s="
                 f"{cfg.weight_sync.timeout_s:g}s (node lost?): the run goes on with {len(live)} "
                 f"engine(s); they rejoin once Ray places them again", "clsrl.job", logging.WARNING)
    if not live:
        raise RuntimeError(f"no rollout engine is left (all {len(workers)} gone, last ones on lost nodes?) "
                           f"and none came back within weight_sync.timeout_s={cfg.weight_sync.timeout_s:g}s")
    return live
