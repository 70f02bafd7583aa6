"""Box rewards for one target: ``grounding_giou`` (Visual-RFT on LISA) and ``rec_iou`` (VLM-R1 REC).

The IoU / GIoU math lives here too (``det_*`` reuse ``box_iou``).

Both rewards read the answer span (see ``parsing.extract_answer``); solutions are boxes in the
0-1000 frame, the same frame the model writes, so no rescaling is needed (the reference
divided both sides by 1000, which leaves IoU and GIoU unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .parsing import (
    Box,
    SolutionCache,
    as_boxes,
    extract_answer,
    find_point_pair,
    find_square_box,
    order_corners,
)
from .registry import RewardParamError, is_real, register


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes as written. A box with x2 <= x1 or y2 <= y1 overlaps nothing: 0."""
    ix1 = a[0] if a[0] > b[0] else b[0]
    iy1 = a[1] if a[1] > b[1] else b[1]
    ix2 = a[2] if a[2] < b[2] else b[2]
    iy2 = a[3] if a[3] < b[3] else b[3]
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    # A positive intersection implies both boxes have positive width and height here.
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    v = inter / union if union > 0 else 0.0
    return min(1.0, v) if v >= 0.0 else 0.0  # `>=` is False for NaN (inf/inf): score 0


def box_giou(a: Box, b: Box) -> float:
    """Generalised IoU in [-1, 1] of two boxes with ordered corners.

    IoU minus the share of the smallest enclosing box that neither box covers. When the
    enclosing box has no area (both boxes on one line) it is the IoU, as in the reference.
    """
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union if union > 0 else 0.0
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    g = iou - (c - union) / c if c > 0 else iou
    if not g >= -1.0:  # also catches NaN from overflowing areas
        return -1.0
    return 1.0 if g > 1.0 else g


_gt_boxes = lambda sol: as_boxes(sol, allow_empty=False)  # noqa: E731


@register("grounding_giou", value_range=(0.0, 2.0))
def grounding_giou(
    completions: Sequence[str], solutions: Sequence[Any], info: Mapping[str, Any]
) -> list[float]:
    """GIoU + 1 in [0, 2] of the first ``(x1,y1),(x2,y2)`` in the answer; 0 if there is none.

    Our spec: the predicted corners are put in order before scoring (a box written
    bottom-right first is the same box), with several ground-truth boxes the prediction is
    scored against the best-matching one (the reference mixed the corners of different boxes
    into one), and decimal coordinates are read as the numbers they are (the reference's
    pattern read integers only and scored ``(100.5,200),(300,400)`` 0: a valid box in the
    requested frame, written more precisely than asked, is not a wrong answer).
    """
    gt_of = SolutionCache(_gt_boxes)
    out: list[float] = []
    for text, sol in zip(completions, solutions, strict=True):
        gts = gt_of(sol)
        pred = find_point_pair(extract_answer(text))
        if pred is None:
            out.append(0.0)
            continue
        pred = order_corners(pred)
        out.append(max(box_giou(pred, g) for g in gts) + 1.0)
    return out


def _check_rec(params: Mapping[str, Any]) -> None:
    t = params["threshold"]
    if t is not None and (not is_real(t) or not 0.0 <= float(t) <= 1.0):
        raise RewardParamError(
            f"reward 'rec_iou': param 'threshold' must be None or a number in [0, 1], got {t!r}"
        )


@register("rec_iou", check=_check_rec)
def rec_iou(
    completions: Sequence[str],
    solutions: Sequence[Any],
    info: Mapping[str, Any],
    *,
    threshold: float | None = None,
) -> list[float]:
    """IoU in [0, 1] of the first ``[x1, y1, x2, y2]`` in the answer with the solution box.

    ``threshold=None`` (default): the continuous IoU. ``threshold=t``: 1.0 if IoU > t else
    0.0 (VLM-R1 used t = 0.5). Corners are taken as written, as in the reference: an
    inverted box covers nothing and scores 0. A solution listing several boxes is scored
    against the best-matching one.
    """
    gt_of = SolutionCache(_gt_boxes)
    thr = None if threshold is None else float(threshold)
    out: list[float] = []
    for text, sol in zip(completions, solutions, strict=True):
        gts = gt_of(sol)
        pred = find_square_box(extract_answer(text))
        if pred is None:
            out.append(0.0)
            continue
        v = max(box_iou(pred, g) for g in gts)
        out.append(v if thr is None else (1.0 if v > thr else 0.0))
    return out
