"""LISA-style grounding: a question about an image, answered with the object's box.

Two readers:

- `read_grounding_jsonl`: our layout, one JSON object a line, image paths relative to the file:
  `{"image": "imgs/a.jpg", "question": "...", "boxes": [[x1, y1, x2, y2], ...], "split": "train",
  "id"?: "..."}` with boxes as integers in the image's 0-1000 frame (`"expression"` may stand for
  `"question"`, and `"box": [x1, y1, x2, y2]` for a single box).
- `read_reasonseg`: LISA's ReasonSeg release (train/, val/, test/ folders of `name.jpg` + `name.json`,
  the JSON holding `text` (one or more questions), `is_sentence` and labelme-style `shapes`: polygons
  labelled "target" or "ignore"). The target polygons become a box in the 0-1000 frame.

`write_grounding_jsonl` converts either into our layout. The solution is what grounding_giou reads.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tasks.boxes import Box1000, as_solution, check_frame_box, pixel_box_to_frame
from tasks.manifest import (
    IMAGE_SUFFIXES,
    DatasetError,
    check_unique_ids,
    jsonl_rows,
    read_json,
    split_folders,
)

JSONL_KEYS = {"image", "question", "expression", "boxes", "box", "split", "id"}
REASONSEG_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class GroundingSample:
    id: str
    image: Path
    question: str
    boxes: tuple[Box1000, ...]  # at least one; grounding_giou scores the best-matching one
    split: str

    def solution(self) -> list[list[int]]:
        """What grounding_giou / rec_iou take as the solution: a non-empty list of [x1, y1, x2, y2]."""
        return as_solution(self.boxes)


def _jsonl_row(row: object, where: str) -> tuple[str, str, list, str, str | None]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    extra = row.keys() - JSONL_KEYS
    questions = [k for k in ("question", "expression") if k in row]
    box_keys = [k for k in ("boxes", "box") if k in row]
    if extra or "image" not in row or "split" not in row or len(questions) != 1 or len(box_keys) != 1:
        raise DatasetError(f"{where}: expected keys image, split, one of question/expression, one of "
                           f"boxes/box (and optional id); got {sorted(row)}")
    question = row[questions[0]]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: {questions[0]!r} must be non-empty text, got {question!r}")
    boxes = [row["box"]] if box_keys[0] == "box" else row["boxes"]
    if not isinstance(boxes, list) or not boxes:
        raise DatasetError(f"{where}: 'boxes' must be a non-empty list of [x1, y1, x2, y2], got {boxes!r}")
    return str(row["image"]), question.strip(), boxes, str(row["split"]), row.get("id")


def read_grounding_jsonl(path: str | Path) -> list[GroundingSample]:
    """Our grounding layout (see the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"grounding file not found: {path}")
    samples: list[GroundingSample] = []
    for lineno, where, row in jsonl_rows(path):
        image, question, raw_boxes, split, sid = _jsonl_row(row, where)
        try:
            boxes = tuple(check_frame_box(b) for b in raw_boxes)
        except ValueError as err:
            raise DatasetError(f"{where}: {err}") from None
        samples.append(GroundingSample(str(sid) if sid is not None else f"{path.stem}-{lineno}",
                                       path.parent / image, question, boxes, split))
    _check_ids(samples, path)
    return samples


def _check_ids(samples: list[GroundingSample], source: Path) -> None:
    check_unique_ids([s.id for s in samples], source)
    if not samples:
        raise DatasetError(f"{source}: no grounding samples")


def _polygon_extent(points: object, where: str) -> tuple[float, float, float, float]:
    def is_pair(p: object) -> bool:
        return isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)

    if not (isinstance(points, list) and points and all(is_pair(p) for p in points)):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y] pairs, got {points!r}")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _reasonseg_image(ann: Path) -> Path:
    for p in sorted(ann.parent.glob(ann.stem + ".*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return p
    raise DatasetError(f"{ann}: no image beside it (expected {ann.stem}.jpg in {ann.parent}; ReasonSeg pairs "
                       "each name.json with name.jpg)")


def read_reasonseg_file(ann: Path, split: str, merge_targets: bool = True,
                        all_questions: bool = True) -> list[GroundingSample]:
    """One ReasonSeg annotation: a sample per question (or the first only), boxed from the target polygons.

    `merge_targets`: one box enclosing every target polygon (the box of LISA's target mask, the default),
    or one box per polygon (grounding_giou then scores the prediction against the best-matching one).
    """
    data = read_json(ann, "ReasonSeg annotation")
    if not isinstance(data, dict) or "text" not in data or not isinstance(data.get("shapes"), list):
        raise DatasetError(f"{ann}: not a ReasonSeg annotation (expected keys 'text' and 'shapes', "
                           f"got {sorted(data) if isinstance(data, dict) else type(data).__name__})")
    texts = [data["text"]] if isinstance(data["text"], str) else data["text"]
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t.strip() for t in texts)):
        raise DatasetError(
            f"{ann}: 'text' must be a question or a non-empty list of questions, got {data['text']!r}"
        )
    image = _reasonseg_image(ann)
    with Image.open(image) as im:  # the header only: the size maps pixels into the 0-1000 frame
        width, height = im.size
    extents = [_polygon_extent(s.get("points"), f"{ann}: shapes[{k}]")
               for k, s in enumerate(data["shapes"]) if isinstance(s, dict) and s.get("label") == "target"]
    if not extents:
        raise DatasetError(f"{ann}: no shape labelled 'target' (a grounding sample needs a box)")
    if merge_targets:
        extents = [(min(e[0] for e in extents), min(e[1] for e in extents),
                    max(e[2] for e in extents), max(e[3] for e in extents))]
    boxes = []
    for x1, y1, x2, y2 in extents:
        # clip to the image first: annotation tools let points stray a little past the border
        x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
        y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
        try:
            boxes.append(pixel_box_to_frame(x1, y1, x2, y2, width, height))
        except ValueError as err:
            raise DatasetError(
                f"{ann}: target polygon has no area inside the {width}x{height} image ({err})"
            ) from None
    picked = texts if all_questions else texts[:1]
    return [GroundingSample(f"{split}/{ann.stem}/{k}", image, t.strip(), tuple(boxes), split)
            for k, t in enumerate(picked)]


def read_reasonseg(root: str | Path, splits: Iterable[str] = REASONSEG_SPLITS, merge_targets: bool = True,
                   all_questions: bool = True) -> list[GroundingSample]:
    """LISA's ReasonSeg folder (root/train/*.json + images, root/val/..., root/test/...); missing splits
    skipped."""
    root = Path(root)
    splits = list(splits)
    present = split_folders(root, splits, "ReasonSeg folder",
                            f"ReasonSeg's split folders {splits} holding name.jpg + name.json")
    samples: list[GroundingSample] = []
    for split in present:
        anns = sorted((root / split).glob("*.json"))
        if not anns:
            raise DatasetError(
                f"{root / split}: no .json annotations (ReasonSeg pairs name.jpg with name.json)"
            )
        for ann in anns:
            samples += read_reasonseg_file(ann, split, merge_targets, all_questions)
    _check_ids(samples, root)
    return samples


def write_grounding_jsonl(samples: Iterable[GroundingSample], path: str | Path) -> Path:
    """Our JSONL layout, image paths relative to the file's folder (so the folder can move as a whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    lines = []
    for s in samples:
        image = s.image.resolve()
        rel = image.relative_to(base) if image.is_relative_to(base) else image
        lines.append(json.dumps({"id": s.id, "image": str(rel), "question": s.question,
                                 "boxes": s.solution(), "split": s.split}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
