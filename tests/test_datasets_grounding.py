"""LISA-style grounding: ReasonSeg polygons -> 0-1000 boxes, our JSONL round trip, real grounding_giou, named errors."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from rewards.registry import get_reward
from tasks.grounding import read_grounding_jsonl, read_reasonseg, write_grounding_jsonl
from tasks.manifest import DatasetError
from tasks.prompts import grounding_prompt

TARGET_1 = [[40, 20], [120, 20], [80, 100]]  # extent (40, 20, 120, 100) in a 400x200 image
TARGET_2 = [[200, 100], [300, 150], [250, 180]]  # extent (200, 100, 300, 180)


def _shape(label, points):
    return {"label": label, "points": points, "shape_type": "polygon", "group_id": None, "flags": {}}


def _pair(folder, stem, size, text, shapes, suffix=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 80, 160)).save(folder / f"{stem}{suffix}")
    (folder / f"{stem}.json").write_text(json.dumps({"text": text, "is_sentence": isinstance(text, str),
                                                     "shapes": shapes}))


def _reasonseg(root):
    _pair(root / "train", "a", (400, 200), ["What could hold the tea?", "Which object holds hot drinks?"],
          [_shape("target", TARGET_1), _shape("ignore", [[0, 0], [400, 0], [400, 200]]), _shape("target", TARGET_2)])
    # a target straying past the border of a 100x100 image, a single question as a string
    _pair(root / "val", "b", (100, 100), "Where would you sit?", [_shape("target", [[-5, -5], [50, 50], [10, 40]])],
          suffix=".png")
    return root


def test_reasonseg_targets_become_one_box_in_the_frame(tmp_path):
    samples = read_reasonseg(_reasonseg(tmp_path))
    assert [s.id for s in samples] == ["train/a/0", "train/a/1", "val/b/0"]
    a0, a1, b0 = samples
    assert a0.question == "What could hold the tea?" and a1.question == "Which object holds hot drinks?"
    assert a0.boxes == a1.boxes == ((100, 100, 750, 900),)  # both targets enclosed, the ignore shape not
    assert b0.boxes == ((0, 0, 500, 500),) and b0.split == "val" and b0.image.suffix == ".png"
    per_polygon = read_reasonseg(tmp_path, merge_targets=False, all_questions=False)
    assert [s.id for s in per_polygon] == ["train/a/0", "val/b/0"]
    assert per_polygon[0].boxes == ((100, 100, 300, 500), (500, 500, 750, 900))
    assert [s.id for s in read_reasonseg(tmp_path, splits=("val",))] == ["val/b/0"]


def test_solutions_are_what_grounding_giou_reads(tmp_path):
    giou = get_reward("grounding_giou")
    merged = read_reasonseg(_reasonseg(tmp_path))[0]
    per_polygon = read_reasonseg(tmp_path, merge_targets=False)[0]
    assert merged.solution() == [[100, 100, 750, 900]]
    exact = "<think>the cup</think><answer>(100,100),(750,900)</answer>"
    second = "<answer>(500,500),(750,900)</answer>"
    assert giou([exact, second], [merged.solution(), per_polygon.solution()]) == [2.0, 2.0]
    assert giou([second], [merged.solution()])[0] < 2.0
    assert grounding_prompt(merged.question).startswith("What could hold the tea?\n")


def test_jsonl_round_trip(tmp_path):
    samples = read_reasonseg(_reasonseg(tmp_path / "lisa"))
    out = write_grounding_jsonl(samples, tmp_path / "lisa" / "grounding.jsonl")
    first = json.loads(out.read_text().splitlines()[0])
    assert first == {"id": "train/a/0", "image": "train/a.jpg", "question": "What could hold the tea?",
                     "boxes": [[100, 100, 750, 900]], "split": "train"}
    back = read_grounding_jsonl(out)
    assert [(s.id, s.image.resolve(), s.question, s.boxes, s.split) for s in back] == \
           [(s.id, s.image.resolve(), s.question, s.boxes, s.split) for s in samples]


def test_jsonl_accepts_expression_and_single_box(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"image": "x.jpg", "expression": "the red car", "box": [1, 2, 30, 40], "split": "test"})
                 + "\n\n")
    (s,) = read_grounding_jsonl(f)
    assert (s.id, s.image, s.question, s.boxes, s.split) == ("g-1", tmp_path / "x.jpg", "the red car",
                                                             ((1, 2, 30, 40),), "test")


GOOD = {"image": "a.jpg", "question": "q", "boxes": [[0, 0, 10, 10]], "split": "train", "id": "1"}


@pytest.mark.parametrize("row, needle", [
    ("{oops", "g.jsonl:2: not valid JSON"),
    ({k: v for k, v in GOOD.items() if k != "split"}, "g.jsonl:2: expected keys image, split"),
    ({**GOOD, "expression": "q2"}, "g.jsonl:2: expected keys image, split, one of question/expression"),
    ({**GOOD, "boxes": []}, "g.jsonl:2: 'boxes' must be a non-empty list"),
    ({**GOOD, "boxes": [[0.5, 0, 10, 10]]}, "g.jsonl:2: box must be [x1, y1, x2, y2] as 4 integers"),
    ({**GOOD, "boxes": [[0, 0, 10, 1001]]}, "g.jsonl:2: box must satisfy 0 <= x1 < x2 <= 1000"),
    ({**GOOD, "boxes": [[10, 0, 5, 10]]}, "g.jsonl:2: box must satisfy"),
    ({**GOOD, "question": "  "}, "g.jsonl:2: 'question' must be non-empty text"),
    (GOOD, "g.jsonl: duplicate ids ['1']"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, row, needle):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(DatasetError) as err:
        read_grounding_jsonl(f)
    assert needle in str(err.value)


def test_reasonseg_wrong_layouts_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"ReasonSeg folder not found"):
        read_reasonseg(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"expected ReasonSeg's split folders \['train', 'val', 'test'\].*'images'"):
        read_reasonseg(tmp_path)
    _reasonseg(tmp_path)
    (tmp_path / "val" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"val/b.json: no image beside it"):
        read_reasonseg(tmp_path)
    _pair(tmp_path / "val", "b", (100, 100), "q", [_shape("ignore", [[0, 0], [9, 9]])])
    with pytest.raises(DatasetError, match=r"val/b.json: no shape labelled 'target'"):
        read_reasonseg(tmp_path)
    _pair(tmp_path / "val", "b", (100, 100), "q", [_shape("target", [[200, 200], [300, 300]])])
    with pytest.raises(DatasetError, match=r"val/b.json: target polygon has no area inside the 100x100 image"):
        read_reasonseg(tmp_path)
    (tmp_path / "val" / "b.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match=r"val/b.json: not a ReasonSeg annotation"):
        read_reasonseg(tmp_path)
