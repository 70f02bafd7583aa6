"""Boxes in the model's frame: integers in 0-1000 relative to the image, as the detection and grounding
prompts ask."""
from __future__ import annotations

import math

FRAME = 1000
Box1000 = tuple[int, int, int, int]  # (x1, y1, x2, y2), x1 < x2 and y1 < y2, all in [0, FRAME]


def _scale(v: float, size: float) -> int:
    return min(FRAME, max(0, round(v / size * FRAME)))


def pixel_box_to_frame(x1: float, y1: float, x2: float, y2: float, width: float, height: float) -> Box1000:
    """Pixel corners -> the 0-1000 frame, rounded to the nearest integer and clipped to the image.

    A box that rounds to zero width or height keeps one unit: the rewards give an empty box no IoU,
    so a tiny real object would otherwise become unmatchable.
    """
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")
    vals = (x1, y1, x2, y2)
    if not all(math.isfinite(v) for v in vals) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"box must have x1 < x2 and y1 < y2 (finite), got {list(vals)}")
    a, b, c, d = _scale(x1, width), _scale(y1, height), _scale(x2, width), _scale(y2, height)
    if c <= a:
        a, c = (a, a + 1) if a < FRAME else (FRAME - 1, FRAME)
    if d <= b:
        b, d = (b, b + 1) if b < FRAME else (FRAME - 1, FRAME)
    return (a, b, c, d)


def coco_box_to_frame(bbox: list[float], width: float, height: float) -> Box1000:
    """COCO's [x, y, w, h] in pixels -> [x1, y1, x2, y2] in the 0-1000 frame."""
    x, y, w, h = bbox
    return pixel_box_to_frame(x, y, x + w, y + h, width, height)


def check_frame_box(value: object) -> Box1000:
    """A box already in the 0-1000 frame (our JSONL files): 4 integers, ordered, inside the frame."""
    if not (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"box must be [x1, y1, x2, y2] as 4 integers in 0-{FRAME}, got {value!r}")
    x1, y1, x2, y2 = value
    if not (0 <= x1 < x2 <= FRAME and 0 <= y1 < y2 <= FRAME):
        raise ValueError(
            f"box must satisfy 0 <= x1 < x2 <= {FRAME} and 0 <= y1 < y2 <= {FRAME}, got {list(value)}"
        )
    return (x1, y1, x2, y2)


def as_solution(boxes: tuple[Box1000, ...]) -> list[list[int]]:
    """The reward solution: a plain list of [x1, y1, x2, y2] lists (what rewards.parsing.as_boxes reads)."""
    return [list(b) for b in boxes]
