"""Run checkpoints: DeepSpeed state per rank (written by the learners), plus the driver's own state.

    runs/NAME/checkpoints/step-000050/            DeepSpeed shards, `hf/` (save_pretrained export),
                                                   driver.json
    runs/NAME/checkpoints/step-000050/driver.json  step, policy version, data order: written last, so its
                                                   presence marks a checkpoint every rank finished

Retention: `prune_checkpoints` keeps the newest `keep_last` finished checkpoints plus the `keep_best` best by
score (DriverState.score, e.g. held-out accuracy), and removes the rest with the unfinished leftovers of
crashed saves. A folder is renamed out of the `step-*` namespace before it is deleted, so a crash mid-delete
never leaves a half-deleted folder that still looks finished.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

DRIVER_STATE = "driver.json"
_TAG = re.compile(r"^step-(\d+)$")
_TRASH = ".deleting-"  # prefix of a folder being deleted (does not match _TAG: never resumed from)

log = logging.getLogger(__name__)


@dataclass
class DriverState:
    step: int  # optimizer steps done
    policy_version: int  # the version the engines hold after this step
    data_order: dict = field(default_factory=dict)  # tasks.order.EpochOrder.state_dict()
    # the config the checkpoint was made with, for a diff on resume
    config: dict = field(default_factory=dict)
    # How good this checkpoint is, higher = better (the driver records held-out eval accuracy when it
    # evaluated at this step); prune_checkpoints(keep_best=...) ranks by it. None = not evaluated here: never
    # kept as "best".
    score: float | None = None


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def write_driver_state(ckpt_root: str | Path, tag: str, state: DriverState) -> Path:
    path = Path(ckpt_root) / tag / DRIVER_STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)  # atomic: a crash leaves either no marker or a whole one
    return path


def complete_tags(ckpt_root: str | Path) -> list[str]:
    """Finished checkpoints, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / DRIVER_STATE).is_file()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def read_checkpoint(ckpt_root: str | Path, tag: str | None = None) -> tuple[str, DriverState]:
    """(tag, state) of `tag`, or of the newest finished checkpoint; errors say what exists."""
    tags = complete_tags(ckpt_root)
    if not tags:
        raise FileNotFoundError(f"no finished checkpoint under {ckpt_root} (a checkpoint is finished once "
                                f"its {DRIVER_STATE} exists); nothing to resume")
    if tag is None:
        tag = tags[-1]
    elif tag not in tags:
        raise FileNotFoundError(f"checkpoint {tag!r} not found or unfinished under {ckpt_root}; "
                                f"finished: {', '.join(tags)}")
    data = json.loads((Path(ckpt_root) / tag / DRIVER_STATE).read_text())
    return tag, DriverState(**data)


def _step(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def checkpoint_scores(ckpt_root: str | Path) -> dict[str, float]:
    """{tag: DriverState.score} of the finished checkpoints that have a finite one."""
    out = {}
    for tag in complete_tags(ckpt_root):
        try:
            score = json.loads((Path(ckpt_root) / tag / DRIVER_STATE).read_text()).get("score")
        except (OSError, ValueError, AttributeError):  # unreadable marker: no score, but still a checkpoint
            continue
        if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
            out[tag] = float(score)
    return out


def prune_checkpoints(ckpt_root: str | Path, keep_last: int, keep_best: int = 0,
                      scores: dict[str, float] | None = None) -> list[str]:
    """Delete the checkpoints retention does not keep; returns the deleted tags, oldest first.

    Kept: the newest `keep_last` finished checkpoints, plus the `keep_best` finished ones with the highest
    score (`scores` {tag: score}, default each driver.json's `score`; tags without one are never "best"; ties
    go to the newer), plus any unfinished folder newer than the newest finished checkpoint (a save may be in
    progress). Deleted: every other finished checkpoint and every unfinished folder older than the newest
    finished one (a crashed save). keep_last=0 keeps everything (pruning off); otherwise the newest finished
    one always stays. Call it after write_driver_state, from the one process that writes the markers (the
    driver); with per-node disks, each node's copy needs its own call.
    """
    if keep_last < 0 or keep_best < 0:
        raise ValueError(f"prune_checkpoints: keep_last and keep_best must be >= 0, "
                         f"got {keep_last}, {keep_best}")
    root = Path(ckpt_root)
    finished = complete_tags(root)
    if keep_last == 0 or not finished:
        return []
    newest = _step(finished[-1])
    keep = set(finished[-keep_last:])
    if keep_best:
        if scores is None:
            scored = checkpoint_scores(root)
        else:
            scored = {t: float(v) for t, v in scores.items()
                      if t in finished and v is not None and math.isfinite(v)}
        keep.update(sorted(scored, key=lambda t: (scored[t], _step(t)), reverse=True)[:keep_best])
    doomed = [t for t in finished if t not in keep]
    doomed += [p.name for p in root.iterdir()
               if _TAG.match(p.name) and p.is_dir() and p.name not in finished and _step(p.name) < newest]
    doomed.sort(key=_step)
    for tag in doomed:
        trash = root / f"{_TRASH}{tag}"
        if trash.exists():  # a previous delete of this tag crashed half-way
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(root / tag, trash)  # atomic: from here on it is no checkpoint, whatever the rmtree leaves
        shutil.rmtree(trash, ignore_errors=True)
    for leftover in root.glob(f"{_TRASH}*"):  # earlier crashes mid-delete
        shutil.rmtree(leftover, ignore_errors=True)
    if doomed:
        log.info("pruned checkpoints %s under %s (keep_last=%d, keep_best=%d)", ", ".join(doomed), root,
                 keep_last, keep_best)
    return doomed
