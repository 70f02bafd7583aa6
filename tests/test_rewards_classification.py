"""format, cls_accuracy, cls_equality, cls_contains: reference behaviour and our departures."""

from __future__ import annotations

import re

import pytest

from rewards import get_reward
from rewards.parsing import extract_answer

fmt = get_reward("format")
acc = get_reward("cls_accuracy")
eq = get_reward("cls_equality")
contains = get_reward("cls_contains")

REFERENCE_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def one(fn, text, sol=None):
    return fn([text], [sol])[0]


# --- format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("<think>a</think>\n\n<answer>b</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>line1\nline2</think> <answer>x\ny</answer>", 1.0),  # DOTALL
        ("<think>a</think>b</think> <answer>c</answer>", 1.0),  # lazy .*? still reaches 2nd </think>
        ("<think>a</think><answer>b</answer>c</answer>", 1.0),  # answer body may hold </answer>
        ("<answer>b</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a</think> text <answer>b</answer>", 0.0),
        ("<think>a</think><answer>b</answer> trailing", 0.0),
        ("prefix <think>a</think><answer>b</answer>", 0.0),
        ("<think>a<answer>b</answer>", 0.0),
        ("<think></answer>", 0.0),
        ("<think>a</think><answer></answer", 0.0),
        ("", 0.0),
    ],
)
def test_format_reference_cases(text, expected):
    assert one(fmt, text) == expected
    assert bool(REFERENCE_FORMAT.fullmatch(text)) == bool(expected)  # same as the reference


def test_format_ignores_whitespace_around_text():
    """Our spec: a trailing newline (common before EOS) or leading space is not a format error.

    The reference fullmatch scored "<think>..</think><answer>..</answer>\\n" as 0.
    """
    text = "  \n<think>a</think><answer>b</answer>\n"
    assert REFERENCE_FORMAT.fullmatch(text) is None
    assert one(fmt, text) == 1.0
    assert one(fmt, "\t<think>a</think> <answer>b</answer> \u3000") == 1.0  # unicode space too


# --- answer span ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, span",
    [
        ("<answer>cat</answer>", "cat"),
        ("<think>x</think><answer> a\nb </answer>", " a\nb "),
        ("<answer>one</answer><answer>two</answer>", "one"),
        ("<think>x</think><answer>truncat", "truncat"),
        ("no tags here", "no tags here"),
        ("</answer>cat<answer>", ""),
    ],
)
def test_extract_answer(text, span):
    assert extract_answer(text) == span


# --- cls_accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, label, expected",
    [
        ("<think>it has fur</think><answer>cat</answer>", "cat", 1.0),
        ("<think>it has fur</think><answer> Cat </answer>", "cat", 1.0),  # stripped, case
        ("<think>it has fur</think><answer>CAT</answer>", "Cat", 1.0),
        ("<think>it has fur</think><answer>dog</answer>", "cat", 0.0),
        ("<think>it has fur</think><answer>a cat</answer>", "cat", 0.0),  # equality, not contains
        ("cat", "cat", 1.0),  # no tags: whole text
        ("It is a cat.", "cat", 0.0),
        ("<answer>dog</answer><answer>cat</answer>", "cat", 0.0),  # first span only
        ("<answer></answer>", "cat", 0.0),
        ("<think>a cat</think><answer>cat", "cat", 1.0),  # unclosed: rest of text
    ],
)
def test_cls_accuracy_reference_cases(text, label, expected):
    assert one(acc, text, label) == expected


def test_cls_accuracy_no_math_verify():
    """Our spec: no math-verify. It scored "Boeing 737-400" against "Boeing 737-800" as correct
    (it parsed the numbers as an expression); ours is a string check and gives 0."""
    assert one(acc, "<answer>Boeing 737-400</answer>", "Boeing 737-800") == 0.0
    assert one(acc, "<answer>Boeing 737-800</answer>", "Boeing 737-800") == 1.0
    assert one(acc, "<answer>2</answer>", "2.0") == 0.0


def test_cls_accuracy_newlines_inside_answer_span():
    """Our spec: the span may contain newlines. The reference regex had no DOTALL, so a
    multi-line first span was skipped and a later one-line span (or the whole text) graded."""
    assert one(acc, "<think>x</think><answer>\nGolden Retriever\n</answer>", "golden retriever") == 1.0
    # The first span decides; the reference would have graded the later one-line span.
    assert one(acc, "<answer>\ndog\n</answer> <answer>cat</answer>", "cat") == 0.0


def test_cls_accuracy_underscore_and_whitespace_runs():
    """Our spec: runs of whitespace and `_` count as one space on both sides, so dataset
    labels written with `_` (CoOp class names) match the natural spelling."""
    assert one(acc, "<answer>Golden  Retriever</answer>", "golden_retriever") == 1.0
    assert one(acc, "<answer>golden _\t retriever</answer>", "Golden Retriever") == 1.0
    assert one(acc, "<answer>golden_retriever</answer>", "golden retriever") == 1.0
    assert one(acc, "<answer>goldenretriever</answer>", "golden retriever") == 0.0
    assert one(acc, "<answer>golden retriever dog</answer>", "golden retriever") == 0.0


@pytest.mark.parametrize(
    "fn, label",
    [(fn, label) for fn in (acc, eq, contains) for label in (None, "", "  ", ["cat"])]
    + [(acc, "_ _"), (contains, "_ _")],  # empty once `_` is normalised away
)
def test_cls_bad_label_raises(fn, label):
    """Labels come from our data: a malformed one is a bug to surface, not a 0 to hide."""
    with pytest.raises(ValueError, match="solution"):
        fn(["cat"], [label])


# --- cls_equality ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, label, expected",
    [
        ("cat", "cat", 1.0),
        ("Cat", "cat", 0.0),  # case-sensitive, as in No-Thinking
        ("<answer>cat</answer>", "cat", 0.0),  # no tag extraction
        ("a cat", "cat", 0.0),
        ("golden_retriever", "golden retriever", 0.0),
    ],
)
def test_cls_equality_reference_cases(text, label, expected):
    assert one(eq, text, label) == expected


def test_cls_equality_whitespace_around_text():
    """Our spec: whitespace around the completion is ignored; the reference compared the raw
    text, so "cat\\n" (a newline before EOS) scored 0 for a right answer."""
    assert one(eq, " cat\n", "cat") == 1.0
    assert one(eq, "\tGolden Retriever \n", "Golden Retriever") == 1.0
    assert one(eq, "Golden  Retriever", "Golden Retriever") == 0.0  # inner spacing still exact


# --- cls_contains ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, label, expected",
    [
        ("<answer>golden retriever</answer>", "Golden_Retriever", 1.0),
        ("<answer>a golden retriever dog</answer>", "golden retriever", 1.0),  # answer contains label
        ("<answer>retriever</answer>", "golden retriever", 1.0),  # label contains answer
        ("<answer>GoldenRetriever</answer>", "golden retriever", 1.0),  # spaces removed
        ("<answer>labrador</answer>", "golden retriever", 0.0),
        ("I think this is a golden retriever", "golden retriever", 1.0),  # whole text fallback
        ("<think>golden retriever?</think><answer>poodle</answer>", "golden retriever", 0.0),
    ],
)
def test_cls_contains_reference_cases(text, label, expected):
    assert one(contains, text, label) == expected


def test_cls_contains_no_math_verify():
    """Our spec: no math-verify (it matched "Boeing 737-400" to "Boeing 737-800")."""
    assert one(contains, "<answer>Boeing 737-400</answer>", "Boeing 737-800") == 0.0


def test_cls_contains_empty_answer_scores_zero():
    """Our spec: an empty answer scores 0. The reference gave 1 because "" is contained in
    every label: a reward hack (answer nothing, get paid)."""
    for text in [
        "<answer></answer>",
        "<answer>   </answer>",
        "<answer>_ _</answer>",
        "<answer>\n</answer>",
        "",
        "   ",
        "<think>x</think><answer>",
    ]:
        assert one(contains, text, "golden retriever") == 0.0, text


def test_cls_contains_newlines_inside_answer_span():
    """Newlines count as whitespace (removed) and the span may be multi-line."""
    assert one(contains, "<answer>\ngolden\nretriever\n</answer>", "golden retriever") == 1.0


def test_batches_mix_labels():
    texts = ["<answer>cat</answer>", "<answer>dog</answer>", "<answer>cat</answer>", "cow"]
    labels = ["cat", "cat", "dog", "cow"]
    assert acc(texts, labels) == [1.0, 0.0, 0.0, 1.0]
    assert contains(texts, labels) == [1.0, 0.0, 0.0, 1.0]
    assert eq(texts, labels) == [0.0, 0.0, 0.0, 1.0]
