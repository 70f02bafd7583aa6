"""The papers' evaluation protocols, as scorers with the reward signature (1 = correct), so a task's
`correct_reward` can name one and the same machinery scores training-time evals and `clsrl eval`.

- ``eval_cls_rl`` (CLS-RL's protocol): the graded answer (first ``<answer>`` span, or the whole text without
  tags) is correct if it equals the label ignoring case, or contains the label, where the label is also tried
  with ``_`` read as a space. More lenient than the ``cls_accuracy`` training reward (equality only).
- ``eval_visual_rft`` (Visual-RFT's protocol): the answer must sit in ``<answer>`` tags (a missing tag is
  wrong); answer and label, lowercased with whitespace and ``_`` removed, are compared by containment either
  way. An empty answer is wrong (containment of "" would credit it; see ``cls_contains``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .grounding import box_iou
from .parsing import ANSWER_OPEN, as_boxes, compact_lower, extract_answer, find_point_pair, order_corners
from .registry import register


def _label(sol: Any) -> str:
    if not isinstance(sol, str) or not sol.strip():
        raise ValueError(f"classification solution must be a non-empty class-name str, got {sol!r}")
    return sol


@register("eval_cls_rl")
def eval_cls_rl(completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]) -> list[float]:
    out = []
    for text, sol in zip(completions, solutions, strict=True):
        label = _label(sol).strip().lower()
        answer = extract_answer(text).strip().lower()
        correct = answer == label or label in answer or label.replace("_", " ") in answer
        out.append(1.0 if answer and correct else 0.0)
    return out


@register("eval_visual_rft")
def eval_visual_rft(
    completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]
) -> list[float]:
    out = []
    for text, sol in zip(completions, solutions, strict=True):
        label = compact_lower(_label(sol))
        if ANSWER_OPEN not in text:
            out.append(0.0)
            continue
        answer = compact_lower(extract_answer(text))
        out.append(1.0 if answer and (label in answer or answer in label) else 0.0)
    return out


@register("eval_grounding_iou50")
def eval_grounding_iou50(
    completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]
) -> list[float]:
    """Grounding accuracy at IoU 0.5 (the usual REC / LISA box metric): the answer's first ``(x1,y1),(x2,y2)``
    pair, corners put in order, overlaps its best-matching ground-truth box with IoU > 0.5."""
    out = []
    for text, sol in zip(completions, solutions, strict=True):
        gts = as_boxes(sol, allow_empty=False)
        pair = find_point_pair(extract_answer(text))
        if pair is None:
            out.append(0.0)
            continue
        box = order_corners(pair)
        out.append(1.0 if max(box_iou(box, g) for g in gts) > 0.5 else 0.0)
    return out
