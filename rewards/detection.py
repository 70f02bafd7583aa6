"""Visual-RFT detection rewards: ``det_iou`` and ``det_confidence``.

The model answers ``[{'Position': [x1, y1, x2, y2], 'Confidence': c}, ...]`` (0-1000 frame)
or ``No Objects``; the solution is a list of ground-truth boxes (empty = no object).

Reference pipeline, kept: parse the list (single quotes allowed, a list doubly bracketed as
``[[{...}]]`` read as ``[{...}]``, a list cut off by the token limit repaired), drop duplicate
boxes (first kept), sort by confidence (descending, stable), match each prediction greedily to
the unmatched ground-truth box of highest IoU and keep it if IoU > ``iou_threshold`` (0.5).

Our spec departures:
- a list is repaired only when the answer was cut off (``<answer>`` never closed): its complete
  entries are scored. A list missing its ``]`` inside a closed answer is a format error and
  scores 0 (the reference's repair, meant for truncation, scored 0 on one entry and dropped
  the last complete entry of several);
- a correct negative scores 1 for both rewards: ``No Objects`` or ``[]`` when there is no
  ground-truth box (the reference parsed neither and scored 0, punishing the right answer);
- malformed output scores 0 and never raises (the reference relied on a bare ``except``);
- ``det_confidence`` clips each confidence to [0, 1] before scoring. The reference clipped
  only the final mean, so an out-of-range confidence on one box could pay for another box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .grounding import box_iou
from .literal import Malformed, parse_literal
from .parsing import Box, SolutionCache, answer_span, as_boxes
from .registry import register, require_unit_interval

# A completion is at most ~1k tokens; an answer longer than this is garbage, and refusing it
# up front bounds the parse (which is linear anyway) to a few milliseconds.
MAX_ANSWER_CHARS = 65536

Prediction = tuple[Box, float]  # (box as written, raw confidence)
Matched = tuple[float, float]  # (kept IoU or 0.0, raw confidence)


def _is_no_objects(s: str) -> bool:
    # The prompt says: return 'No Objects'. Accept it quoted, with a period, any case/spacing.
    if len(s) > 40:
        return False
    return " ".join(s.strip(" \t\r\n'\"`.").split()).lower() == "no objects"


def parse_predictions(answer: str, cut_off: bool = False) -> list[Prediction] | None:
    """Predictions in ``answer``; ``[]`` for an explicit negative; None if malformed.

    ``cut_off``: generation stopped inside the answer, so an unclosed list keeps its complete
    entries; otherwise an unclosed list is malformed."""
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    if _is_no_objects(s):
        return []
    if not s.startswith("["):
        return None
    try:
        value, complete = parse_literal(s)
    except Malformed:
        return None
    if type(value) is not list or (not complete and (not cut_off or not value)):
        return None  # cut off before the first complete entry: nothing to score, not a negative
    if len(value) == 1 and type(value[0]) is list:
        value = value[0]  # `[[{...}, {...}]]`, as the reference's `[[` -> `[`, `]]` -> `]` rewrite read it
    preds: list[Prediction] = []
    for item in value:
        if type(item) is not dict:
            return None
        pos = item.get("Position")
        conf = item.get("Confidence")
        if type(pos) is not list or len(pos) != 4 or type(conf) is not float:
            return None
        if not all(type(v) is float for v in pos):  # the parser gives every number as float
            return None
        preds.append(((pos[0], pos[1], pos[2], pos[3]), conf))
    return preds


def match_predictions(preds: Sequence[Prediction], gts: Sequence[Box], thr: float) -> list[Matched]:
    """Dedup, sort by confidence, greedy-match. One (iou, confidence) per kept prediction."""
    seen: set[Box] = set()
    unique: list[Prediction] = []
    for p in preds:
        if p[0] not in seen:
            seen.add(p[0])
            unique.append(p)
    unique.sort(key=lambda p: p[1], reverse=True)  # stable: ties keep answer order
    taken = [False] * len(gts)
    out: list[Matched] = []
    for box, conf in unique:
        best, best_k = 0.0, -1
        for k, g in enumerate(gts):
            if not taken[k]:
                v = box_iou(box, g)
                if v > best:
                    best, best_k = v, k
        if best > thr:
            taken[best_k] = True
            out.append((best, conf))
        else:
            out.append((0.0, conf))
    return out


def _threshold_check(name: str):
    def check(params: Mapping[str, Any]) -> None:
        require_unit_interval(name, "iou_threshold", params["iou_threshold"])

    return check


_gt_boxes = lambda sol: as_boxes(sol, allow_empty=True)  # noqa: E731


def _score(completions: Sequence[str], solutions: Sequence[Any], thr: float, conf_mode: bool) -> list[float]:
    gt_of = SolutionCache(_gt_boxes)
    out: list[float] = []
    for text, sol in zip(completions, solutions, strict=True):
        gts = gt_of(sol)  # outside the try: a bad solution is our bug and must raise
        try:
            preds = parse_predictions(*answer_span(text))
        except Exception:  # defence in depth: model text must never crash training
            preds = None
        if preds is None:
            out.append(0.0)
        elif not preds:
            out.append(1.0 if not gts else 0.0)  # our spec: correct negative scores 1
        else:
            matched = match_predictions(preds, gts, thr)
            if conf_mode:
                total = 0.0
                for iou, c in matched:
                    c = 0.0 if c < 0.0 else 1.0 if c > 1.0 else c
                    total += c if iou > 0.0 else 1.0 - c
                out.append(total / len(matched))
            else:
                r = sum(iou for iou, _ in matched) / max(len(gts), len(matched))
                out.append(min(1.0, r))
    return out


@register("det_iou", check=_threshold_check("det_iou"))
def det_iou(
    completions: Sequence[str],
    solutions: Sequence[Any],
    info: Mapping[str, Any],
    *,
    iou_threshold: float = 0.5,
) -> list[float]:
    """Sum of matched IoUs / max(#gt, #predictions after dedup), in [0, 1]; correct negative 1."""
    return _score(completions, solutions, float(iou_threshold), conf_mode=False)


@register("det_confidence", check=_threshold_check("det_confidence"))
def det_confidence(
    completions: Sequence[str],
    solutions: Sequence[Any],
    info: Mapping[str, Any],
    *,
    iou_threshold: float = 0.5,
) -> list[float]:
    """Mean over predictions of c if matched else 1 - c (c clipped to [0, 1]); correct negative 1."""
    return _score(completions, solutions, float(iou_threshold), conf_mode=True)
