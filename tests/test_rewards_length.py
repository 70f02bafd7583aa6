"""The sigmoid-normalised length reward."""

from __future__ import annotations

import math

import pytest

from rewards import get_reward
from rewards.length import DEFAULT_L0

length = get_reward("length")


def sig(z):
    return 1 / (1 + math.exp(-z))


def test_default_reference_length():
    assert DEFAULT_L0 == 512.0
    out = length(["a", "b", "c"], None, completion_lengths=[0, 512, 1024])
    assert out == pytest.approx([sig(-1), 0.5, sig(1)])


def test_alpha_and_l0():
    fn = get_reward("length", alpha=2.0, L0=100)
    assert fn(["a", "b"], None, completion_lengths=[150, 50]) == pytest.approx([sig(1.0), sig(-1.0)])
    fn = get_reward("length", alpha=-1.0, L0=100)  # a negative alpha rewards brevity
    assert fn(["a"], None, completion_lengths=[200]) == pytest.approx([sig(-1.0)])


def test_monotone_and_bounded_without_overflow():
    lengths = [0, 1, 10, 100, 511, 512, 513, 10**6, 10**12]
    out = get_reward("length", alpha=50.0)(["x"] * len(lengths), None, completion_lengths=lengths)
    assert out == sorted(out)
    assert all(0.0 <= v <= 1.0 for v in out)
    assert out[-1] == 1.0


def test_length_uses_info_not_text():
    """L is the token count from the rollout; the text itself is ignored."""
    assert length(["", "x" * 10000], None, completion_lengths=[512, 512]) == [0.5, 0.5]


def test_missing_key_names_it():
    with pytest.raises(ValueError, match="completion_lengths"):
        length(["a"], None)
    with pytest.raises(ValueError, match="completion_lengths"):
        length(["a"], None, completion_length=[3])  # typo'd key


@pytest.mark.parametrize("lengths", [[1], [1, 2, 3], 5, "ab"])
def test_misaligned_key_names_it(lengths):
    with pytest.raises(ValueError, match="completion_lengths"):
        length(["a", "b"], None, completion_lengths=lengths)


@pytest.mark.parametrize("bad", [-1, None, "3", float("nan"), True])
def test_bad_length_values(bad):
    with pytest.raises(ValueError, match=r"completion_lengths'\]\[1\]"):
        length(["a", "b"], None, completion_lengths=[3, bad])


def test_numpy_ints_accepted():
    np = pytest.importorskip("numpy")
    assert length(["a"], None, completion_lengths=np.array([512])) == [0.5]
