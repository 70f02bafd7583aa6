"""Run checkpoints: DeepSpeed state per rank (written by the learners), plus the driver's own state.

    runs/NAME/checkpoints/step-000050/            DeepSpeed shards, `hf/` (save_pretrained export), driver.json
    runs/NAME/checkpoints/step-000050/driver.json  step, policy version, data order: written last, so its presence
                                                   marks a checkpoint every rank finished
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

DRIVER_STATE = "driver.json"
_TAG = re.compile(r"^step-(\d+)$")


@dataclass
class DriverState:
    step: int  # optimizer steps done
    policy_version: int  # the version the engines hold after this step
    data_order: dict = field(default_factory=dict)  # tasks.order.EpochOrder.state_dict()
    config: dict = field(default_factory=dict)  # the config the checkpoint was made with, for a diff on resume


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
        raise FileNotFoundError(f"no finished checkpoint under {ckpt_root} (a checkpoint is finished once its "
                                f"{DRIVER_STATE} exists); nothing to resume")
    if tag is None:
        tag = tags[-1]
    elif tag not in tags:
        raise FileNotFoundError(f"checkpoint {tag!r} not found or unfinished under {ckpt_root}; finished: {', '.join(tags)}")
    data = json.loads((Path(ckpt_root) / tag / DRIVER_STATE).read_text())
    return tag, DriverState(**data)
