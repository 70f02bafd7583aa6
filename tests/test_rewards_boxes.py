"""det_iou, det_confidence, grounding_giou, rec_iou: worked examples with hand-computed values."""

from __future__ import annotations

import json

import pytest

from rewards import get_reward
from rewards.literal import Malformed, parse_literal

det_iou = get_reward("det_iou")
det_conf = get_reward("det_confidence")
giou = get_reward("grounding_giou")
rec = get_reward("rec_iou")
rec_thr = get_reward("rec_iou", threshold=0.5)


def det(preds, single_quotes=True, think="<think>I look.</think>"):
    body = repr(preds) if single_quotes else json.dumps(preds)
    return f"{think}<answer>{body}</answer>"


def P(box, conf):
    return {"Position": box, "Confidence": conf}


def both(text, gts):
    return det_iou([text], [gts])[0], det_conf([text], [gts])[0]


GT2 = [[0, 0, 100, 100], [200, 200, 300, 300]]


# --- detection: worked examples ------------------------------------------------------------


def test_det_worked_example():
    """A: IoU 8000/10000 = 0.8 with gt0. B: exact on gt1 = 1.0. C: nothing = 0.
    det_iou = (0.8 + 1.0) / max(2 gt, 3 pred) = 0.6.
    det_confidence = (0.9 + 0.8 + (1 - 0.3)) / 3 = 0.8."""
    text = det([P([0, 0, 100, 80], 0.9), P([200, 200, 300, 300], 0.8), P([500, 500, 600, 600], 0.3)])
    i, c = both(text, GT2)
    assert i == pytest.approx(0.6)
    assert c == pytest.approx(0.8)


def test_det_perfect():
    assert both(det([P([0, 0, 100, 100], 1.0), P([200, 200, 300, 300], 1.0)]), GT2) == (1.0, 1.0)


def test_det_missing_box_divides_by_gt_count():
    """One exact box out of two gt: 1.0 / max(2, 1) = 0.5."""
    assert both(det([P([0, 0, 100, 100], 0.7)]), GT2) == (pytest.approx(0.5), pytest.approx(0.7))


def test_det_duplicates_dropped():
    """The repeated box (first one kept, confidence 0.9) counts once: (0.8 + 1.0) / 2 = 0.9;
    kept without dedup it would be (0.8 + 0 + 1.0) / 3 = 0.6. Confidence: (0.9 + 0.8) / 2."""
    text = det([P([0, 0, 100, 80], 0.9), P([0, 0, 100, 80], 0.1), P([200, 200, 300, 300], 0.8)])
    i, c = both(text, GT2)
    assert i == pytest.approx(0.9)
    assert c == pytest.approx(0.85)


def test_det_sorted_by_confidence():
    """P2 (conf 0.9, IoU 0.6) is matched before P1 (conf 0.4, IoU 0.9) although P1 comes first:
    det_iou = 0.6 / 2 = 0.3 (answer order would give 0.45);
    det_confidence = (0.9 + (1 - 0.4)) / 2 = 0.75."""
    text = det([P([0, 0, 100, 90], 0.4), P([0, 0, 100, 60], 0.9)])
    i, c = both(text, [[0, 0, 100, 100]])
    assert i == pytest.approx(0.3)
    assert c == pytest.approx(0.75)


def test_det_greedy_matching_takes_highest_iou_gt():
    """P1 (0.9) = [0,0,100,70]: IoU 0.7 with G1, 4000/7000 = 0.571 with G2: takes G1.
    P2 (0.8) = [0,0,100,95]: G1 taken, IoU with G2 = 4000/9500 = 0.42 < 0.5: unmatched.
    Greedy gives 0.7 / 2 = 0.35 (the optimal assignment would give 0.76): reference behaviour."""
    text = det([P([0, 0, 100, 70], 0.9), P([0, 0, 100, 95], 0.8)])
    i, c = both(text, [[0, 0, 100, 100], [0, 0, 100, 40]])
    assert i == pytest.approx(0.35)
    assert c == pytest.approx((0.9 + 0.2) / 2)


def test_det_greedy_picks_best_gt_per_prediction():
    """[0,0,100,55] has IoU 0.55 with G1 but 5000/5500 = 0.909 with G2: it takes G2;
    then [0,0,100,100] takes G1 with 1.0. Sum (0.909 + 1.0) / 2."""
    text = det([P([0, 0, 100, 55], 0.9), P([0, 0, 100, 100], 0.8)])
    i, _ = both(text, [[0, 0, 100, 100], [0, 0, 100, 50]])
    assert i == pytest.approx((5000 / 5500 + 1.0) / 2)


@pytest.mark.parametrize("h, expected", [(50, 0.0), (51, 0.51), (49, 0.0)])
def test_det_iou_threshold_is_strict(h, expected):
    """IoU must be > 0.5: exactly 0.5 is unmatched (and its confidence counts as 1 - c)."""
    i, c = both(det([P([0, 0, 100, h], 0.6)]), [[0, 0, 100, 100]])
    assert i == pytest.approx(expected)
    assert c == pytest.approx(0.6 if expected else 0.4)


def test_det_threshold_param():
    fn = get_reward("det_iou", iou_threshold=0.3)
    assert fn([det([P([0, 0, 100, 40], 0.6)])], [[[0, 0, 100, 100]]]) == [pytest.approx(0.4)]


def test_det_single_and_double_quotes_agree():
    preds = [P([0, 0, 100, 80], 0.9), P([200, 200, 300, 300], 0.8)]
    a = both(det(preds, single_quotes=True), GT2)
    b = both(det(preds, single_quotes=False), GT2)
    assert a == b == (pytest.approx(0.9), pytest.approx(0.85))


@pytest.mark.parametrize(
    "answer",
    [
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}, {'Position': [200, 2",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}, {'Posi",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}, ",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}, {'Position': [200, 200, 300, 300], 'Confidence': 0.",
    ],
)
def test_det_truncated_list_repaired(answer):
    """Cut off by the token limit (no `]`, no `</answer>`): the complete entries are scored,
    1.0 / max(2 gt, 1 pred) = 0.5. An entry whose `}` never came is dropped, even when its
    fields look complete (last case): its confidence may have been cut mid-number."""
    i, c = both(f"<think>two boxes</think><answer>{answer}", GT2)
    assert (i, c) == (pytest.approx(0.5), pytest.approx(0.9))


def test_det_truncated_before_any_entry_is_not_a_negative():
    """A list cut before its first entry is malformed (0), not the empty list `[]`."""
    for answer in ["[", "[{'Position': [0, 0", "[{'Posi"]:
        assert both(f"<answer>{answer}", []) == (0.0, 0.0)


def test_det_truncated_inside_string():
    assert both("<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}, {'Posit", GT2)[0] == 0.5


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "I found a cat at the left.",
        "Here: [{'Position': [0, 0, 100, 100], 'Confidence': 0.9}]",  # prose before the list
        "[{'Position': [0, 0, 100], 'Confidence': 0.9}]",  # 3 numbers
        "[{'Position': [0, 0, 100, 100, 5], 'Confidence': 0.9}]",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 'high'}]",
        "[{'Position': [0, 0, 100, 100]}]",  # no confidence
        "[{'Position': ['0', 0, 100, 100], 'Confidence': 0.9}]",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9} {'Position': [0, 0, 1, 1], 'Confidence': 0.9}]",
        "[[0, 0, 100, 100]]",  # boxes without dicts
        "{'Position': [0, 0, 100, 100], 'Confidence': 0.9}",  # not a list
        "[{'Position': [0, 0, 100, 100], 'Confidence': 1e999}]",
        "[{'Position': [0, 0, 100, 100], 'Confidence': nan}]",
        "[{'Position': [0, 0, 100, 100], 'Confidence': 0.9},, ]",
        "[" * 50 + "]" * 50,
    ],
)
def test_det_malformed_scores_zero(answer):
    assert both(f"<think>x</think><answer>{answer}</answer>", GT2) == (0.0, 0.0)


def test_det_huge_coordinates_stay_in_range():
    text = "<answer>[{'Position': [-1e308, -1e308, 1e308, 1e308], 'Confidence': 0.9}]</answer>"
    assert both(text, GT2) == (0.0, pytest.approx(0.1))
    text = "<answer>[{'Position': [0, 0, 1e308, 1e308], 'Confidence': 0.9}]</answer>"
    assert both(text, [[0, 0, 1e308, 1e308]]) == (0.0, pytest.approx(0.1))  # inf / inf


def test_det_trailing_text_after_list_ignored():
    assert both("<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1.0}] done</answer>", GT2)[0] == 0.5


def test_det_answer_without_tags_is_whole_text():
    assert both("[{'Position': [0, 0, 100, 100], 'Confidence': 1.0}]", [[0, 0, 100, 100]]) == (1.0, 1.0)


# --- detection: our spec departures ---------------------------------------------------------


@pytest.mark.parametrize(
    "answer", ["No Objects", "'No Objects'", "no objects.", " No  Objects ", "[]", "[ ]", '"No Objects"']
)
def test_det_correct_negative_scores_one(answer):
    """Our spec: "No Objects" or `[]` when there is no ground-truth box scores 1 for both
    det_iou and det_confidence. The reference could not parse "No Objects" and divided by
    max(0, 0) for `[]`, scoring 0: it punished the answer the prompt asks for."""
    assert both(f"<think>nothing there</think><answer>{answer}</answer>", []) == (1.0, 1.0)


@pytest.mark.parametrize("answer", ["No Objects", "[]"])
def test_det_negative_when_objects_exist_scores_zero(answer):
    assert both(f"<answer>{answer}</answer>", GT2) == (0.0, 0.0)


def test_det_boxes_when_none_exist():
    """No gt: every prediction is unmatched. det_iou 0; det_confidence rewards low confidence."""
    i, c = both(det([P([0, 0, 10, 10], 0.2), P([5, 5, 50, 50], 0.4)]), [])
    assert i == 0.0
    assert c == pytest.approx(((1 - 0.2) + (1 - 0.4)) / 2)


def test_det_confidence_clipped_per_box():
    """Confidences are clipped to [0, 1] box by box. The reference clipped the mean only, so a
    matched box with confidence 1.5 paid for an unmatched box with 0.9: (1.5 + 0.1) / 2 = 0.8.
    Ours: (1.0 + 0.1) / 2 = 0.55."""
    text = det([P([0, 0, 100, 100], 1.5), P([700, 700, 800, 800], 0.9)])
    assert det_conf([text], [[[0, 0, 100, 100]]]) == [pytest.approx(0.55)]
    text = det([P([700, 700, 800, 800], -3.0)])
    assert det_conf([text], [[[0, 0, 100, 100]]]) == [1.0]


def test_det_inverted_prediction_overlaps_nothing():
    """Corners are taken as written for detection (reference): x2 < x1 covers nothing."""
    assert both(det([P([100, 100, 0, 0], 0.9)]), [[0, 0, 100, 100]]) == (0.0, pytest.approx(0.1))


def test_det_bad_solution_raises():
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        det_iou(["<answer>[]</answer>"], [[[0, 0, 100]]])
    with pytest.raises(ValueError):
        det_iou(["<answer>[]</answer>"], ["[[0, 0, 1, 1]]"])
    with pytest.raises(ValueError):
        det_conf(["<answer>[]</answer>"], [[[0, 0, 1, float("nan")]]])


def test_parse_literal_basics():
    assert parse_literal("[1, 'a', \"b\", true, None, {'k': [2.5, -1e2]},]") == (
        [1.0, "a", "b", True, None, {"k": [2.5, -100.0]}],
        True,
    )
    assert parse_literal("[1, [2, 3") == ([1.0], False)
    with pytest.raises(Malformed):
        parse_literal("[" * 9)
    with pytest.raises(Malformed):
        parse_literal("[1 2]")


# --- grounding_giou ------------------------------------------------------------------------


def g(pair_text, gts):
    return giou([f"<think>the dog</think><answer>{pair_text}</answer>"], [gts])[0]


def test_grounding_exact_and_partial():
    assert g("(0,0),(100,100)", [[0, 0, 100, 100]]) == 2.0
    # IoU 0.5, enclosing box = union: GIoU 0.5 -> 1.5
    assert g("(0,0),(100,50)", [[0, 0, 100, 100]]) == pytest.approx(1.5)
    # disjoint: IoU 0, union 20000, enclosing 30000: GIoU = -1/3 -> 2/3
    assert g("(200,0),(300,100)", [[0, 0, 100, 100]]) == pytest.approx(2 / 3)
    # far apart: GIoU tends to -1
    assert 0.0 <= g("(999,999),(1000,1000)", [[0, 0, 1, 1]]) < 0.01


def test_grounding_spacing_and_decimals():
    assert g("( 0 , 0 ) , ( 100 , 100 )", [[0, 0, 100, 100]]) == 2.0
    assert g("(0.0,0),(100.0,100)", [[0, 0, 100, 100]]) == 2.0


def test_grounding_first_pair_wins():
    assert g("(0,0),(100,100) or (500,500),(600,600)", [[0, 0, 100, 100]]) == 2.0


def test_grounding_corners_reordered():
    """Our spec: corners are put in order before scoring; (100,0),(0,100) is the same box as
    (0,0),(100,100). The reference used them as written (negative width)."""
    assert g("(100,0),(0,100)", [[0, 0, 100, 100]]) == 2.0
    assert g("(100,100),(0,0)", [[0, 0, 100, 100]]) == 2.0
    assert g("(100,50),(0,0)", [[0, 0, 100, 100]]) == pytest.approx(1.5)


def test_grounding_best_matching_gt_box():
    """Our spec: with several gt boxes, score against the best-matching one. The reference
    collected every box's corners into one list and read [0] and [1], i.e. the first corners
    of two different boxes: here the bogus box (0,0)-(500,500)."""
    gts = [[0, 0, 100, 100], [500, 500, 600, 600]]
    assert g("(500,500),(600,600)", gts) == 2.0
    assert g("(0,0),(100,100)", gts) == 2.0
    assert g("(0,0),(500,500)", gts) < 1.2


def test_grounding_no_pair_scores_zero():
    assert g("the dog on the left", [[0, 0, 100, 100]]) == 0.0
    assert g("[0, 0, 100, 100]", [[0, 0, 100, 100]]) == 0.0
    assert g("(0,0)", [[0, 0, 100, 100]]) == 0.0
    # a pair in the think part does not count when the answer has none
    assert giou(["<think>(0,0),(100,100)</think><answer>none</answer>"], [[[0, 0, 100, 100]]]) == [0.0]
    # no tags: the whole text is the answer
    assert giou(["(0,0),(100,100)"], [[[0, 0, 100, 100]]]) == [2.0]


def test_grounding_flat_solution_box_accepted_and_bad_raises():
    assert giou(["<answer>(0,0),(100,100)</answer>"], [[0, 0, 100, 100]]) == [2.0]
    with pytest.raises(ValueError):
        giou(["<answer>(0,0),(1,1)</answer>"], [[]])
    with pytest.raises(ValueError):
        giou(["<answer>(0,0),(1,1)</answer>"], [[[0, 0, 1]]])


# --- rec_iou -------------------------------------------------------------------------------


def r(box_text, gt, fn=rec):
    return fn([f"<think>left dog</think><answer>{box_text}</answer>"], [gt])[0]


def test_rec_iou_continuous_by_default():
    assert r("[0, 0, 100, 100]", [0, 0, 100, 100]) == 1.0
    assert r("[0, 0, 100, 50]", [0, 0, 100, 100]) == pytest.approx(0.5)
    assert r("[50,0,150,100]", [0, 0, 100, 100]) == pytest.approx(5000 / 15000)
    assert r("[200, 200, 300, 300]", [0, 0, 100, 100]) == 0.0


def test_rec_iou_threshold_variant():
    """threshold=0.5: 1 if IoU > 0.5 else 0 (VLM-R1's variant); 0.5 itself is not enough."""
    assert r("[0, 0, 100, 60]", [0, 0, 100, 100], rec_thr) == 1.0
    assert r("[0, 0, 100, 50]", [0, 0, 100, 100], rec_thr) == 0.0
    assert r("[0, 0, 100, 40]", [0, 0, 100, 100], rec_thr) == 0.0
    assert get_reward("rec_iou", threshold=0.3)(["<answer>[0,0,100,40]</answer>"], [[0, 0, 100, 100]]) == [1.0]


def test_rec_iou_parsing():
    assert r("The box is [ 0 , 0 , 100 , 100 ].", [0, 0, 100, 100]) == 1.0
    assert r("[0, 0, 100, 100] then [0, 0, 10, 10]", [0, 0, 100, 100]) == 1.0  # first box
    assert r("[[0, 0, 100, 100]]", [0, 0, 100, 100]) == 1.0
    assert r("[0, 0, 100]", [0, 0, 100, 100]) == 0.0
    assert r("(0,0),(100,100)", [0, 0, 100, 100]) == 0.0
    assert r("[100, 100, 0, 0]", [0, 0, 100, 100]) == 0.0  # inverted: as written, covers nothing
    assert r("[0, 0, " + "9" * 40 + ", 100]", [0, 0, 100, 100]) == 0.0  # absurd number
    assert rec(["<think>[0,0,100,100]</think><answer>no idea</answer>"], [[0, 0, 100, 100]]) == [0.0]


def test_rec_iou_solution_shapes():
    np = pytest.importorskip("numpy")
    assert rec(["<answer>[0,0,100,100]</answer>"], [np.array([0, 0, 100, 100])]) == [1.0]
    assert det_iou(["<answer>[]</answer>"], [np.zeros((0, 4))]) == [1.0]
    assert rec(["<answer>[0,0,100,100]</answer>"], [[[0, 0, 100, 100]]]) == [1.0]
    assert rec(["<answer>[0,0,100,100]</answer>"], [(100, 100, 0, 0)]) == [1.0]  # our data: ordered
    with pytest.raises(ValueError, match="4 numbers"):
        rec(["<answer>[0,0,100,100]</answer>"], [[0, 0, 100]])
