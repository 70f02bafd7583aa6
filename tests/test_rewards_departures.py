"""Box rewards where the reference's own code scores differently, each decided on purpose (docs/methods.md,
"Departures from the reference"): follow the reference where it is sane, depart where it rewards a hack or punishes
a valid answer."""

from __future__ import annotations

import pytest

from rewards import get_reward

det_iou = get_reward("det_iou")
det_conf = get_reward("det_confidence")
giou = get_reward("grounding_giou")
rec = get_reward("rec_iou")

GT = [[100, 100, 200, 200]]
BOX = "{'Position': [100, 105, 200, 200], 'Confidence': 0.9}"  # IoU 9500 / 10000 with GT
FAR = "{'Position': [600, 600, 700, 700], 'Confidence': 0.2}"  # overlaps nothing


def both(text: str, gts=GT) -> tuple[float, float]:
    return det_iou([text], [gts])[0], det_conf([text], [gts])[0]


# --- followed: a doubly bracketed list is the list (the reference rewrote `[[` / `]]` to `[` / `]`) ----------------

def test_det_double_brackets_score_like_the_list():
    assert both(f"<answer>[[{BOX}]]</answer>") == both(f"<answer>[{BOX}]</answer>") \
        == (pytest.approx(0.95), pytest.approx(0.9))
    two = both(f"<answer>[[{BOX}, {FAR}]]</answer>")
    assert two == both(f"<answer>[{BOX}, {FAR}]</answer>") == (pytest.approx(0.95 / 2), pytest.approx(0.85))


@pytest.mark.parametrize("answer", [f"[[{BOX}], [{FAR}]]", f"[[[{BOX}]]]", "[[100, 105, 200, 200]]"])
def test_det_other_nestings_stay_malformed(answer):
    """One level of wrapping is read through; lists of lists and deeper nesting score 0 (the reference's rewrite
    did not parse them either)."""
    assert both(f"<answer>{answer}</answer>") == (0.0, 0.0)


# --- followed: a list missing its `]` inside a closed answer is a format error ----------------------------------

@pytest.mark.parametrize("answer", [f"[{BOX}", f"[{BOX}, {FAR}", f"[{BOX},"])
def test_det_unclosed_list_in_a_closed_answer_scores_zero(answer):
    """The model closed its answer: the list was not cut off, it is malformed. The reference's repair (meant for
    truncation) scored one entry 0; with several it dropped the last complete one; we score 0 throughout."""
    assert both(f"<think>x</think><answer>{answer}</answer>") == (0.0, 0.0)
    assert both(answer) == (0.0, 0.0)  # no tags at all: nothing says it was cut off either


def test_det_unclosed_list_cut_off_by_the_token_limit_keeps_its_complete_entries():
    assert both(f"<think>x</think><answer>[{BOX}") == (pytest.approx(0.95), pytest.approx(0.9))
    assert both(f"<think>x</think><answer>[{BOX}, {FAR}, {{'Posi") == (pytest.approx(0.95 / 2), pytest.approx(0.85))


# --- departed: decimal coordinates are read (the reference's patterns read integers only and scored 0) ----------

def test_grounding_reads_decimal_coordinates():
    assert giou(["<answer>(100.5,200),(300,400)</answer>"], [[[100, 200, 300, 400]]]) == [pytest.approx(1.9975)]
    assert giou(["<answer>(100,200),(300,400)</answer>"], [[[100, 200, 300, 400]]]) == [2.0]


def test_rec_reads_decimal_coordinates():
    assert rec(["<answer>[100.5, 200, 300, 400]</answer>"], [[100, 200, 300, 400]]) == [pytest.approx(0.9975)]
