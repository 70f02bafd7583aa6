"""Classification rewards: ``cls_accuracy`` (CLS-RL), ``cls_equality`` (No-Thinking),
``cls_contains`` (Visual-RFT). The solution is the class-name string.

None of them runs math-verify (our spec): it parsed class names as expressions and scored
"Boeing 737-400" against "Boeing 737-800" as correct. They are plain string checks written
for throughput (>100k completions/s on one core): a few C-level str calls per completion,
labels normalised once per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .parsing import compact_lower, extract_answer, words_lower
from .registry import register


def _label_cache(normalise: Callable[[str], Any]) -> Callable[[Any], Any]:
    """Normalise each distinct label once per batch; a bad label is our data's bug: raise."""
    seen: dict[str, Any] = {}

    def get(sol: Any) -> Any:
        if not isinstance(sol, str):
            raise ValueError(f"classification solution must be a class-name str, got {sol!r}")
        hit = seen.get(sol)
        if hit is None:
            hit = normalise(sol)
            if not hit or not hit[0]:
                raise ValueError(f"classification solution {sol!r} is empty after normalisation")
            seen[sol] = hit
        return hit

    return get


def _words_label(sol: str) -> tuple[str, int]:
    w = words_lower(sol)
    return w, w.count(" ") + 1


@register("cls_accuracy")
def cls_accuracy(
    completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]
) -> list[float]:
    """1.0 if the first answer span (or the whole text without tags) equals the label, else 0.0.

    Equality ignores case and treats every run of whitespace and ``_`` as one space, ends
    trimmed (our spec: "golden_retriever" == "Golden  Retriever"); newlines may appear
    inside the span (our spec; the reference regex had no DOTALL).
    """
    label_of = _label_cache(_words_label)
    out: list[float] = []
    append = out.append
    for text, sol in zip(completions, solutions, strict=True):
        label, n_words = label_of(sol)
        ans = extract_answer(text)
        # split(maxsplit=n_words) stops after n_words+1 pieces: a megabyte of prose costs
        # one replace and one partial split, not a million word objects.
        parts = ans.replace("_", " ").split(None, n_words)
        append(1.0 if len(parts) == n_words and " ".join(parts).lower() == label else 0.0)
    return out


@register("cls_equality")
def cls_equality(
    completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]
) -> list[float]:
    """1.0 if the whole completion equals the label exactly (case-sensitive), else 0.0.

    Our spec: whitespace around the completion is ignored (a trailing newline is not a
    wrong answer); the label is trimmed too. No answer-tag extraction: No-Thinking answers
    directly.
    """
    label_of = _label_cache(str.strip)
    return [
        1.0 if text.strip() == label_of(sol) else 0.0
        for text, sol in zip(completions, solutions, strict=True)
    ]


@register("cls_contains")
def cls_contains(
    completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]
) -> list[float]:
    """1.0 if the answer and the label, lowercased with whitespace and ``_`` removed, contain one another.

    Our spec: an answer that is empty after that normalisation scores 0. The reference
    gave it 1 ("" is contained in every label), a reward hack: answer nothing, get paid.
    """
    label_of = _label_cache(compact_lower)
    out: list[float] = []
    append = out.append
    for text, sol in zip(completions, solutions, strict=True):
        label = label_of(sol)
        ans = compact_lower(extract_answer(text))
        append(1.0 if ans and (label in ans or ans in label) else 0.0)
    return out
