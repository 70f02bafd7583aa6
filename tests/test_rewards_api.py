"""Registry, get_reward / available, BoundReward call checks, CompositeReward."""

from __future__ import annotations

import math

import pytest

import rewards
from rewards import CompositeReward, RewardTerm, available, get_reward
from rewards.registry import _REGISTRY, register

ALL = [
    "cls_accuracy",
    "cls_contains",
    "cls_equality",
    "det_confidence",
    "det_iou",
    "eval_cls_rl",
    "eval_grounding_iou50",
    "eval_visual_rft",
    "format",
    "grounding_giou",
    "length",
    "rec_iou",
]


def test_available_is_sorted_and_complete():
    assert available() == ALL


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as e:
        get_reward("cls_acuracy")
    msg = str(e.value)
    assert "cls_acuracy" in msg
    for name in ALL:
        assert name in msg
    assert "did you mean 'cls_accuracy'" in msg


def test_unknown_param_is_named_with_accepted_ones():
    with pytest.raises(ValueError) as e:
        get_reward("rec_iou", thresh=0.5)
    assert "'thresh'" in str(e.value) and "threshold" in str(e.value)
    with pytest.raises(ValueError) as e:
        get_reward("format", alpha=1.0)
    assert "'alpha'" in str(e.value) and "none" in str(e.value)


@pytest.mark.parametrize(
    "name, params",
    [
        ("rec_iou", {"threshold": 1.5}),
        ("rec_iou", {"threshold": "0.5"}),
        ("rec_iou", {"threshold": True}),
        ("det_iou", {"iou_threshold": -0.1}),
        ("det_confidence", {"iou_threshold": float("nan")}),
        ("length", {"L0": 0}),
        ("length", {"alpha": float("inf")}),
    ],
)
def test_invalid_param_values_raise(name, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        get_reward(name, **params)


def test_params_are_bound_and_visible():
    fn = get_reward("rec_iou", threshold=0.5)
    assert fn.params == {"threshold": 0.5}
    assert fn.__name__ == "rec_iou"
    assert get_reward("length").params == {"alpha": 1.0, "L0": 512.0}


def test_batch_shape_errors_are_loud():
    fn = get_reward("cls_accuracy")
    with pytest.raises(ValueError, match="one solution per completion"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="one solution per completion"):
        fn(["a"], None)
    with pytest.raises(TypeError, match="list of str"):
        fn("cat", ["cat"])
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        fn(["cat", None], ["cat", "cat"])


def test_format_and_length_accept_any_solutions():
    assert get_reward("format")(["x", "y"], [None, object()]) == [0.0, 0.0]
    assert get_reward("format")(["x"]) == [0.0]
    out = get_reward("length")(["x"], None, completion_lengths=[512])
    assert out == [0.5]


def test_empty_batch():
    for name in ALL:
        assert get_reward(name)([], [], completion_lengths=[]) == []


def test_register_decorator_adds_a_reward():
    @register("test_only_constant", value_range=(0.0, 1.0))
    def _const(completions, solutions, info, *, value: float = 0.25):
        return [float(value)] * len(completions)

    try:
        assert "test_only_constant" in available()
        assert get_reward("test_only_constant", value=0.75)(["a", "b"], [1, 2]) == [0.75, 0.75]
        with pytest.raises(ValueError, match="already registered"):
            register("test_only_constant")(_const)
    finally:
        del _REGISTRY["test_only_constant"]


def test_register_rejects_param_without_default():
    with pytest.raises(TypeError, match="needs a default"):

        @register("test_only_bad")
        def _bad(completions, solutions, info, *, p):  # pragma: no cover
            return []

    assert "test_only_bad" not in available()


# --- composite -----------------------------------------------------------------------


def test_exports():
    assert rewards.CompositeReward is CompositeReward
    assert rewards.RewardTerm is RewardTerm
    t = RewardTerm("format")
    assert (t.weight, t.params) == (1.0, {})


def test_composite_totals_are_weighted_sums():
    comp = CompositeReward(
        [
            RewardTerm("format", weight=0.5),
            RewardTerm("cls_accuracy", weight=2.0),
            RewardTerm("length", weight=-1.0, params={"L0": 100}),
        ]
    )
    completions = [
        "<think>fur</think><answer>cat</answer>",  # format 1, acc 1
        "<think>fur</think><answer>dog</answer>",  # format 1, acc 0
        "cat",  # format 0, acc 1
    ]
    lengths = [100, 200, 0]
    totals, comps = comp(completions, ["cat", "cat", "cat"], completion_lengths=lengths)
    assert list(comps) == ["format", "cls_accuracy", "length"]
    assert comps["format"] == [1.0, 1.0, 0.0]
    assert comps["cls_accuracy"] == [1.0, 0.0, 1.0]
    sig = [1 / (1 + math.exp(-(L - 100) / 100)) for L in lengths]
    assert comps["length"] == pytest.approx(sig)
    expected = [0.5 * f + 2.0 * a - s for f, a, s in zip(comps["format"], comps["cls_accuracy"], sig, strict=True)]
    assert totals == pytest.approx(expected)
    assert totals[0] == pytest.approx(2.5 - 0.5)


def test_composite_from_config():
    comp = CompositeReward.from_config(
        [
            {"name": "rec_iou", "weight": 3, "params": {"threshold": 0.5}},
            {"name": "format"},
        ]
    )
    assert comp.names == ["rec_iou", "format"]
    totals, comps = comp(["<think>t</think><answer>[0,0,100,60]</answer>"], [[0, 0, 100, 100]])
    assert comps == {"rec_iou": [1.0], "format": [1.0]}
    assert totals == [4.0]


def test_composite_from_config_names_a_typod_key():
    with pytest.raises(ValueError) as e:
        CompositeReward.from_config([{"name": "format"}, {"name": "cls_accuracy", "wieght": 2.0}])
    msg = str(e.value)
    assert "'wieght'" in msg and "weight" in msg and "term 1" in msg


@pytest.mark.parametrize(
    "config, match",
    [
        ([{"weight": 1.0}], "missing required key 'name'"),
        ([{"name": "nope"}], "available"),
        ([{"name": "rec_iou", "params": {"thresh": 1}}], "thresh"),
        ([{"name": "format", "weight": "high"}], "weight"),
        ([{"name": "format"}, {"name": "format"}], "twice"),
        (["format"], "expected a dict"),
        ({"name": "format"}, "list of dicts"),
        ([], "at least one"),
    ],
)
def test_composite_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        CompositeReward.from_config(config)
