"""A learner rank that dies (its node lost, killed) stops the run with one named error, whatever the learners
were doing: the optimizer step, a checkpoint save or load, a weight broadcast. The survivors fail too (their
collective lost a peer) and their error may be the one ray.get raises first, so every rank is looked at, after
waiting for Ray to mark a lost node's actors dead (its health check takes seconds to tens of seconds)."""
from __future__ import annotations

from pathlib import Path

import ray

from cluster.checkpoint import complete_tags

DEATH_NOTICE_S = 60.0  # how long a lost node's actors may take to be reported dead


def _death(ref) -> ray.exceptions.RayActorError | None:
    """Why the (finished) call `ref` failed, if it failed because its actor died."""
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as err:
        return err
    except Exception:  # noqa: BLE001 - failed otherwise, or still running: not a death
        return None
    return None


def _probe(learners: list, timeout_s: float) -> dict[int, ray.exceptions.RayActorError]:
    """The ranks whose actor is dead now (a live one answers Ray's built-in readiness call)."""
    refs = [a.__ray_ready__.remote() for a in learners]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    return {r: death for r, ref in enumerate(refs) if (death := _death(ref)) is not None}


def learner_death(deaths: dict[int, BaseException], during: str, ckpt_root: Path) -> RuntimeError:
    """The error that stops the run: which ranks died, why, and how to go on."""
    why = next(iter(deaths.values()))
    tags = complete_tags(ckpt_root)
    if tags:
        then = f"its last finished checkpoint is {ckpt_root / tags[-1]}: continue with --resume"
    else:
        then = f"no checkpoint was finished yet under {ckpt_root} (train.save_every): start the run again"
    ranks = ", ".join(map(str, deaths))
    reason = f"{type(why).__name__}: {str(why).splitlines()[0][:300]}"
    return RuntimeError(f"learner rank {ranks} died during {during} ({reason}). The run stops; {then}")


def learner_results(refs: list, during: str, ckpt_root: Path, notice_s: float = DEATH_NOTICE_S) -> list:
    """ray.get of one call per learner rank; a rank's death becomes learner_death's error."""
    try:
        return ray.get(refs)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
        ray.wait(refs, num_returns=len(refs), timeout=notice_s)  # a dead peer's call fails once Ray knows
        deaths = {r: death for r, ref in enumerate(refs) if (death := _death(ref)) is not None}
        if not deaths:
            raise
        raise learner_death(deaths, during, ckpt_root) from None


def check_learners_alive(learners: list, during: str, ckpt_root: Path,
                         timeout_s: float = DEATH_NOTICE_S) -> None:
    """After a failure the learners took part in through other actors (a broadcast): a dead rank is the
    cause worth naming, so raise learner_death's error; a live group returns and the caller re-raises."""
    deaths = _probe(learners, timeout_s)
    if deaths:
        raise learner_death(deaths, during, ckpt_root) from None
