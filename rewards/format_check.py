"""The ``format`` reward: is the completion ``<think>...</think> <answer>...</answer>``?

Reference: ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)``.
That regex backtracks: for every ``</think>`` it retries the rest of the text, which is
quadratic on text with many ``</think>`` tags. Below is the same language, decided in
linear time: the text starts with ``<think>``, ends with ``</answer>``, and somewhere in
between a ``</think>`` is followed, after optional whitespace, by an ``<answer>`` that ends
before the final ``</answer>`` begins. The earliest such ``</think>`` decides, so one
regex search (possessive whitespace, literal prefix) does it.

Our spec: whitespace around the whole text is ignored (a trailing newline after
``</answer>`` is still well formatted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .registry import register

_THINK, _THINK_END, _ANSWER_END = "<think>", "</think>", "</answer>"
_BRIDGE = re.compile(r"</think>\s*+<answer>")


def is_well_formatted(text: str) -> bool:
    s = text.strip()  # our spec: ignore whitespace around the whole text
    if not (s.startswith(_THINK) and s.endswith(_ANSWER_END)):
        return False
    # </think> may start right after <think>; <answer> must end before the final </answer>.
    return _BRIDGE.search(s, len(_THINK), len(s) - len(_ANSWER_END)) is not None


@register("format", uses_solutions=False)
def format_reward(completions: Sequence[str], solutions: Any, info: Mapping[str, Any]) -> list[float]:
    """1.0 if the stripped completion is ``<think>..</think>`` + whitespace + ``<answer>..</answer>``,
    else 0.0."""
    return [1.0 if is_well_formatted(t) else 0.0 for t in completions]
