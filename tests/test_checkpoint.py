"""cluster.checkpoint retention: prune_checkpoints on real folders with real driver.json markers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.checkpoint import (
    DRIVER_STATE,
    DriverState,
    checkpoint_scores,
    complete_tags,
    prune_checkpoints,
    read_checkpoint,
    tag_for,
    write_driver_state,
)


def make_ckpt(root: Path, step: int, score: float | None = None, finished: bool = True) -> str:
    """A checkpoint folder like the learners leave one: shards, an hf/ export, and (if finished) driver.json."""
    tag = tag_for(step)
    (root / tag / "hf").mkdir(parents=True)
    (root / tag / "global_step" / "mp_rank_00_model_states.pt").parent.mkdir()
    (root / tag / "global_step" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 64)
    (root / tag / "hf" / "config.json").write_text("{}")
    if finished:
        write_driver_state(root, tag, DriverState(step=step, policy_version=step, score=score))
    return tag


def on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_score_round_trips_and_old_markers_still_load(tmp_path):
    make_ckpt(tmp_path, 10, score=0.75)
    assert read_checkpoint(tmp_path)[1].score == 0.75
    old = tmp_path / tag_for(20)
    old.mkdir()
    (old / DRIVER_STATE).write_text(json.dumps({"step": 20, "policy_version": 20, "data_order": {}, "config": {}}))
    assert read_checkpoint(tmp_path) == (tag_for(20), DriverState(step=20, policy_version=20))  # score None
    assert checkpoint_scores(tmp_path) == {tag_for(10): 0.75}


def test_keep_last_deletes_older_whole_folders(tmp_path):
    tags = [make_ckpt(tmp_path, s) for s in (10, 20, 30, 40, 50)]
    assert prune_checkpoints(tmp_path, keep_last=2) == tags[:3]
    assert on_disk(tmp_path) == tags[3:] and complete_tags(tmp_path) == tags[3:]
    assert prune_checkpoints(tmp_path, keep_last=2) == []  # idempotent
    assert read_checkpoint(tmp_path)[0] == tag_for(50)


def test_keep_last_zero_keeps_everything(tmp_path):
    tags = [make_ckpt(tmp_path, s) for s in (10, 20)] + [make_ckpt(tmp_path, 5, finished=False)]
    assert prune_checkpoints(tmp_path, keep_last=0, keep_best=1) == []
    assert on_disk(tmp_path) == sorted(tags)


def test_keep_best_by_recorded_score(tmp_path):
    scores = {10: 0.2, 20: 0.9, 30: None, 40: 0.5, 50: 0.9, 60: 0.1, 70: None}
    for s, sc in scores.items():
        make_ckpt(tmp_path, s, score=sc)
    # newest 1 (70) + best 2: 50 and 20 tie at 0.9 (both kept), 40 is third
    assert prune_checkpoints(tmp_path, keep_last=1, keep_best=2) == [tag_for(s) for s in (10, 30, 40, 60)]
    assert on_disk(tmp_path) == [tag_for(s) for s in (20, 50, 70)]
    # a tie at the cut goes to the newer one
    assert prune_checkpoints(tmp_path, keep_last=1, keep_best=1) == [tag_for(20)]


def test_keep_best_overlapping_keep_last_and_explicit_scores(tmp_path):
    tags = [make_ckpt(tmp_path, s, score=0.5) for s in (1, 2, 3, 4)]
    # explicit scores override driver.json; unknown tags and non-finite values are ignored
    explicit = {tags[0]: 0.1, tags[1]: 0.8, tags[3]: 0.99, "step-000099": 5.0, tags[2]: float("nan")}
    # best 2 = tags[3] (also the newest) and tags[1]
    assert prune_checkpoints(tmp_path, keep_last=1, keep_best=2, scores=explicit) == [tags[0], tags[2]]
    assert on_disk(tmp_path) == [tags[1], tags[3]]


def test_unfinished_folders(tmp_path):
    crashed = make_ckpt(tmp_path, 15, finished=False)  # a save that died before driver.json
    kept = [make_ckpt(tmp_path, s) for s in (10, 20)]
    in_progress = make_ckpt(tmp_path, 30, finished=False)  # newer than the newest finished: maybe being written
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step-abc").mkdir()
    assert prune_checkpoints(tmp_path, keep_last=5) == [crashed]
    assert on_disk(tmp_path) == sorted(kept + [in_progress, "notes.txt", "step-abc"])


def test_nothing_finished_deletes_nothing(tmp_path):
    partial = make_ckpt(tmp_path, 10, finished=False)
    assert prune_checkpoints(tmp_path, keep_last=1) == [] and on_disk(tmp_path) == [partial]
    assert prune_checkpoints(tmp_path / "missing", keep_last=1) == []


def test_an_interrupted_delete_is_never_taken_for_a_checkpoint(tmp_path):
    tags = [make_ckpt(tmp_path, s) for s in (10, 20)]
    half = tmp_path / ".deleting-step-000005"  # what a crash between the rename and the rmtree leaves
    (half / "hf").mkdir(parents=True)
    (half / DRIVER_STATE).write_text("{}")
    assert complete_tags(tmp_path) == tags
    assert prune_checkpoints(tmp_path, keep_last=1) == [tags[0]]
    assert on_disk(tmp_path) == [tags[1]]  # the leftover is swept too


@pytest.mark.parametrize("bad", [dict(keep_last=-1), dict(keep_last=1, keep_best=-1)])
def test_rejects_negative_counts(tmp_path, bad):
    with pytest.raises(ValueError, match="must be >= 0"):
        prune_checkpoints(tmp_path, **bad)
