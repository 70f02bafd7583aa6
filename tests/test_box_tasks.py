"""Detection and grounding data through the run's data loading: the bundled box set in COCO's and our grounding
layout, prompts per (image, category) with negatives, and targets the box rewards score as perfect."""
from __future__ import annotations

import pytest

from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, load_config
from rewards import get_reward
from tasks.data import load_run_data
from tasks.examples import format_target


def _cfg(*overrides):
    return load_config(ExperimentConfig, None, ["data.bundled=shapes_boxes", *overrides])


def test_coco_detection_prompts_hold_positives_and_negatives():
    data = load_run_data(_cfg("data.format=coco", "task.prompt=detection", "data.k_shot=2", "data.eval_limit=12"))
    assert len(data.test_examples) == 12
    train = data.train_examples
    assert all(e.id.startswith("shapes_boxes/train/") for e in train)
    assert any(e.solution == [] for e in train) and any(e.solution for e in train)  # negatives and positives
    assert "Detect all objects belonging to the category" in train[0].text
    targets = [format_target("detection", e.solution) for e in train]
    assert get_reward("det_iou")(targets, [e.solution for e in train]) == [1.0] * len(train)
    assert get_reward("det_confidence")(targets, [e.solution for e in train]) == [1.0] * len(train)


def test_grounding_prompts_and_accuracy_at_iou_half():
    data = load_run_data(_cfg("data.format=grounding_jsonl", "task.prompt=grounding", "data.k_shot=5"))
    assert len(data.train_examples) == 5 and data.test_examples
    e = data.train_examples[0]
    assert e.text.startswith("Where is the") and "(x1,y1),(x2,y2)" in e.text
    target = format_target("grounding", e.solution)
    assert get_reward("eval_grounding_iou50")([target], [e.solution]) == [1.0]
    assert get_reward("grounding_giou")([target], [e.solution]) == [2.0]


@pytest.mark.parametrize("overrides,message", [
    (["data.format=coco", "task.prompt=no_think"], "needs task.prompt detection"),
    (["data.format=auto", "data.bundled=shapes", "task.prompt=detection"], "needs task.prompt cls_rl|no_think|visual_rft"),
])
def test_task_and_data_kind_must_agree(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_data(_cfg(*overrides))


def test_box_format_without_root_or_bundled_set_is_named():
    with pytest.raises(ConfigError, match="data.format coco reads from data.root"):
        load_config(ExperimentConfig, None, ["data.format=coco"])


def test_vqa_questions_list_their_choices_and_answer_directly():
    data = load_run_data(_cfg("data.bundled=shapes_vqa", "data.format=vqa_jsonl", "task.prompt=vqa"))
    e = data.train_examples[0]
    assert "Which shape is further" in e.text and "(A) " in e.text and e.text.endswith("Please directly output the answer.")
    assert e.solution in ("(A)", "(B)") and data.test_examples
    assert {t.id for t in data.test_examples}.isdisjoint({t.id for t in data.train_examples})
    assert get_reward("cls_equality")([format_target("vqa", e.solution)], [e.solution]) == [1.0]


def test_vqa_file_errors_name_the_line(tmp_path):
    from tasks.manifest import DatasetError
    from tasks.vqa import read_vqa_jsonl

    (tmp_path / "q.jsonl").write_text('{"image": "a.png", "question": "q?"}\n')
    with pytest.raises(DatasetError, match=r"q.jsonl:1: needs 'image', 'question' and 'answer'"):
        read_vqa_jsonl(tmp_path / "q.jsonl")
