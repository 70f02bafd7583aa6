"""Adversarial inputs (cost must grow at most linearly with their size) and hypothesis property tests
(every reward: right length, floats in range, never raises, on any text)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import available, get_reward
from rewards.format_check import is_well_formatted
from rewards.literal import parse_literal

SOLUTION = {
    "format": None,
    "length": None,
    "cls_accuracy": "golden retriever",
    "cls_equality": "golden retriever",
    "cls_contains": "golden retriever",
    "eval_cls_rl": "golden retriever",
    "eval_visual_rft": "golden retriever",
    "eval_grounding_iou50": [[0, 0, 100, 100], [200, 200, 300, 300]],
    "det_iou": [[0, 0, 100, 100], [200, 200, 300, 300]],
    "det_confidence": [[0, 0, 100, 100], [200, 200, 300, 300]],
    "grounding_giou": [[0, 0, 100, 100], [200, 200, 300, 300]],
    "rec_iou": [0, 0, 100, 100],
}
RANGE = {name: (0.0, 2.0) if name == "grounding_giou" else (0.0, 1.0) for name in SOLUTION}
REWARDS = {name: get_reward(name) for name in available()}
REWARDS["rec_iou@0.5"] = get_reward("rec_iou", threshold=0.5)
MB = 1_000_000


def run(key, texts):
    fn = REWARDS[key]
    name = fn.name
    out = fn(texts, [SOLUTION[name]] * len(texts), completion_lengths=[7] * len(texts))
    assert isinstance(out, list) and len(out) == len(texts)
    lo, hi = RANGE[name]
    for v in out:
        assert type(v) is float and lo <= v <= hi, (key, v)
    return out


def test_solution_table_covers_every_reward():
    assert sorted(SOLUTION) == available()


# --- adversarial inputs ----------------------------------------------------------------------

_PROSE = "the bird has a red crest and long tail feathers, so it could be a cardinal. "
# case -> (head, repeated unit, repeats, tail): the text is head + unit * repeats + tail
ADVERSARIAL = {
    "answer_x20k": ("", "<answer>", 20_000, ""),
    "answer_pairs_x20k": ("", "<answer></answer>", 20_000, ""),
    "paren_1mb": ("", "(", MB, ""),
    "think_closed_1mb": ("<think>", _PROSE, MB // len(_PROSE), "</think><answer>cardinal</answer>"),
    "think_unclosed_1mb": ("<think>", _PROSE, MB // len(_PROSE), ""),
    "think_x50k": ("", "<think>", 50_000, ""),
    "think_close_x50k": ("<think>", "</think>", 50_000, "</answer>"),
    "think_close_ws_x50k": ("<think>", "</think>   \n", 50_000, "<answer</answer>"),
    "bracket_1mb": ("", "[", MB, ""),
    "brace_1mb": ("", "{", MB, ""),
    "position_repeat": ("", "'Position': [", MB // 13, ""),
    "det_prefix_repeat": ("", "<answer>[{'Position': [", MB // 23, ""),
    "digits_1mb": ("", "1", MB, ""),
    "digits_in_answer": ("<answer>[", "9", MB, ", 1, 2, 3]</answer>"),
    "square_pairs": ("", "[]", MB // 2, ""),
    "box_fragments": ("", "[1, 2, 3,", MB // 9, ""),
    "point_fragments": ("", "(1,2),(", MB // 7, ""),
    "quote_1mb": ("<answer>['", "x", MB, ""),
    "whitespace_1mb": ("", " \n\t", MB // 3, ""),
    "underscores_1mb": ("", "_", MB, ""),
    "nul_and_controls": ("", "\x00\x01\x1b[0m\x7f\ud7ff\U0001f600", MB // 7, ""),
    "valid_det_repeat": ("<answer>[", "{'Position': [1, 2, 30, 40], 'Confidence': 0.5}, ", 1300, ""),
}


def adversarial(case: str, scale: float = 1.0) -> str:
    head, unit, repeats, tail = ADVERSARIAL[case]
    return head + unit * max(1, int(repeats * scale)) + tail


def _cost(key: str, text: str) -> float:
    """Seconds of one call, the least of three (a scheduler or GC pause is not the reward's cost)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        run(key, [text])
        best = min(best, time.perf_counter() - t0)
    return best


# Growth, not speed (speed is bench/bench_rewards.py's): a quarter of the input against all of it must cost at
# most 8x (linear: 4x; quadratic: 16x), beyond a 50 ms floor under which nothing matters at these sizes.
GROWTH, FLOOR_S = 8.0, 0.05


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_inputs_cost_at_most_linear_time_and_are_safe(case):
    quarter, whole = adversarial(case, 0.25), adversarial(case)
    superlinear = []
    for key in REWARDS:
        small, big = _cost(key, quarter), _cost(key, whole)
        if big > GROWTH * small + FLOOR_S:
            superlinear.append((key, round(small, 4), round(big, 4)))
    assert not superlinear, f"{case}: (reward, quarter s, whole s) {superlinear}"


def test_adversarial_scores_are_sane():
    # A well-formed answer after a megabyte of thinking is still graded.
    assert run("cls_accuracy", [adversarial("think_closed_1mb")]) == [0.0]
    text = "<think>" + "x " * MB + "</think>\n<answer>Golden_Retriever</answer>"
    assert run("cls_accuracy", [text]) == [1.0]
    assert run("format", [text]) == [1.0]
    assert run("det_iou", [adversarial("bracket_1mb")]) == [0.0]
    assert run("grounding_giou", [adversarial("paren_1mb")]) == [0.0]


# --- property tests ---------------------------------------------------------------------------

FRAGMENTS = [
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "<answer",
    "answer>",
    "[",
    "]",
    "{",
    "}",
    "(",
    ")",
    ",",
    ", ",
    ":",
    "'",
    '"',
    "{'Position': ",
    "'Confidence': ",
    '"Position": ',
    "No Objects",
    "[]",
    " ",
    "\n",
    "_",
    "0",
    "100",
    "0.5",
    "999",
    "-1",
    "1e999",
    ".",
    "golden",
    "retriever",
    "Golden Retriever",
    "[0, 0, 100, 100]",
    "(0,0),(100,100)",
    "\x00",
    "é",
    "\u2028",
    "\ud800",  # a lone surrogate is a valid Python str
]
fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4), st.integers(-5, 2000).map(str)),
    max_size=40,
).map("".join)
any_text = st.one_of(st.text(), fragment_text)
PROPS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("key", sorted(REWARDS))
@PROPS
@given(texts=st.lists(any_text, max_size=6))
def test_any_text_scores_in_range(key, texts):
    run(key, texts)


REFERENCE_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


@settings(max_examples=600, deadline=None, database=None)
@given(
    text=st.lists(
        st.one_of(
            st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u3000", "x", "<", ">"]),
            st.text(max_size=3),
        ),
        max_size=14,
    ).map("".join)
)
def test_format_matches_reference_regex_on_stripped_text(text):
    """Our linear check decides exactly the reference language (after our strip)."""
    assert is_well_formatted(text) == bool(REFERENCE_FORMAT.fullmatch(text.strip()))


BOX = st.lists(st.integers(0, 1000), min_size=4, max_size=4)
PRED = st.fixed_dictionaries({"Position": BOX, "Confidence": st.integers(0, 100).map(lambda c: c / 100)})


@PROPS
@given(preds=st.lists(PRED, min_size=1, max_size=5), gts=st.lists(BOX, max_size=4), data=st.data())
def test_det_truncation_equals_scoring_complete_entries(preds, gts, data):
    """Cutting a detection answer anywhere scores like the entries whose `}` survived."""
    full = repr(preds)
    cut = data.draw(st.integers(1, len(full)), label="cut")
    text = "<think>t</think><answer>" + full[:cut]
    kept = parse_literal(full[:cut])[0] if cut > 0 else []
    n_complete = full[:cut].count("}")
    assert kept == [
        {"Position": [float(v) for v in p["Position"]], "Confidence": p["Confidence"]} for p in preds[:n_complete]
    ]
    for name in ("det_iou", "det_confidence"):
        fn = get_reward(name)
        got = fn([text], [gts])[0]
        if n_complete == 0:
            expected = 0.0
        else:
            expected = fn(["<answer>" + repr(preds[:n_complete]) + "</answer>"], [gts])[0]
        assert got == pytest.approx(expected)
        assert 0.0 <= got <= 1.0


@PROPS
@given(box=BOX, gt=BOX)
def test_grounding_and_rec_agree_on_geometry(box, gt):
    """Ranges hold; an exact box gets GIoU + 1 = 2; GIoU never exceeds IoU."""
    x1, y1, x2, y2 = box
    g = get_reward("grounding_giou")([f"<answer>({x1},{y1}),({x2},{y2})</answer>"], [[gt]])[0]
    r = get_reward("rec_iou")([f"<answer>[{x1}, {y1}, {x2}, {y2}]</answer>"], [gt])[0]
    assert 0.0 <= g <= 2.0 and 0.0 <= r <= 1.0
    ordered = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
    gt_ordered = [min(gt[0], gt[2]), min(gt[1], gt[3]), max(gt[0], gt[2]), max(gt[1], gt[3])]
    if ordered == gt_ordered and ordered[2] > ordered[0] and ordered[3] > ordered[1]:
        assert g == pytest.approx(2.0)
    if r > 0:  # a positive IoU needs the box as written to be a proper box
        assert x2 > x1 and y2 > y1
    if x2 > x1 and y2 > y1:  # written in order: both rewards see the same box
        assert g - 1.0 <= r + 1e-12
