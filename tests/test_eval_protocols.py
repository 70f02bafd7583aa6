"""The papers' evaluation protocols (methods.md, "Evaluation as the papers did it")."""
from __future__ import annotations

import pytest

from rewards import get_reward

CLS_RL = [
    ("<think>fur</think><answer>Golden Retriever</answer>", "golden_retriever", 1.0),  # _ read as a space
    ("<answer>golden retriever</answer>", "Golden Retriever", 1.0),  # case ignored
    ("It is a golden retriever, I think.", "golden retriever", 1.0),  # no tags: contains the label
    ("<answer>retriever</answer>", "golden retriever", 0.0),  # the answer must hold the whole label
    ("<answer>Boeing 737-400</answer>", "Boeing 737-800", 0.0),
    ("", "cat", 0.0),
    ("<answer></answer>", "cat", 0.0),
]
VISUAL_RFT = [
    ("<think>x</think><answer>Golden Retriever</answer>", "golden_retriever", 1.0),  # spaces and _ removed
    ("<answer>retriever</answer>", "golden retriever", 1.0),  # containment either way
    ("<answer>a golden retriever dog</answer>", "golden retriever", 1.0),
    ("golden retriever", "golden retriever", 0.0),  # no answer tag: wrong
    ("<answer>  </answer>", "golden retriever", 0.0),  # empty answer: wrong (not contained-in-everything)
    ("<answer>poodle</answer>", "golden retriever", 0.0),
]


@pytest.mark.parametrize("text,label,expected", CLS_RL)
def test_cls_rl_protocol(text, label, expected):
    assert get_reward("eval_cls_rl")([text], [label]) == [expected]


@pytest.mark.parametrize("text,label,expected", VISUAL_RFT)
def test_visual_rft_protocol(text, label, expected):
    assert get_reward("eval_visual_rft")([text], [label]) == [expected]


def test_a_bad_label_is_our_bug_and_raises():
    with pytest.raises(ValueError, match="non-empty class-name"):
        get_reward("eval_cls_rl")(["x"], [""])


@pytest.mark.parametrize("text,expected", [
    ("<answer>(0,0),(100,100)</answer>", 1.0), ("<answer>(100,100),(0,0)</answer>", 1.0),  # corners put in order
    ("<answer>(210,200),(300,310)</answer>", 1.0),  # matches the second box
    ("<answer>(0,0),(100,40)</answer>", 0.0),  # IoU 0.4
    ("<answer>[0, 0, 100, 100]</answer>", 0.0), ("", 0.0),  # not the grounding format
])
def test_grounding_accuracy_at_iou_half(text, expected):
    assert get_reward("eval_grounding_iou50")([text], [[[0, 0, 100, 100], [200, 200, 300, 300]]]) == [expected]
