"""Text helpers shared by the rewards: answer spans, label normalisation, numbers and boxes.

Everything here runs in time linear in the text, whatever the text is:
- tag spans are found with ``str.find`` (no regex over the tags);
- the few regexes use possessive quantifiers (Python >= 3.11), so a failed attempt
  gives nothing back and no attempt can re-scan more than a bounded stretch;
- the literal parser is an explicit-stack state machine with a depth cap, not recursion
  and not ``ast.literal_eval`` (which recurses and can blow the C stack on ``[[[[...``).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

Box = tuple[float, float, float, float]

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_OPEN_LEN = len(ANSWER_OPEN)

# A number token longer than this is garbage, not a coordinate or a confidence; refusing it
# also keeps float() away from megabyte-long digit runs.
MAX_NUMBER_CHARS = 32


def extract_answer(text: str) -> str:
    """The part of a completion that gets graded.

    - First ``<answer>`` up to the next ``</answer>``. Our spec: newlines are allowed inside
      (the reference regex had no DOTALL, so it skipped multi-line spans and graded a later
      span or the whole text instead).
    - ``<answer>`` never closed (generation hit the token limit): everything after it, so a
      truncated detection list can still be repaired and the think part is never graded.
    - No ``<answer>`` at all: the whole text, as the reference did (e.g. prompts without tags).
    """
    return answer_span(text)[0]


def answer_span(text: str) -> tuple[str, bool]:
    """``(extract_answer(text), cut_off)``: cut_off is True when ``<answer>`` was opened and never
    closed, the one case where the text is known to have been cut off by the token limit."""
    i = text.find(ANSWER_OPEN)
    if i < 0:
        return text, False
    i += _OPEN_LEN
    j = text.find(ANSWER_CLOSE, i)
    return (text[i:], True) if j < 0 else (text[i:j], False)


def words_lower(text: str) -> str:
    """Lowercase with every run of whitespace and ``_`` turned into one space, ends trimmed."""
    return " ".join(text.replace("_", " ").split()).lower()


def compact_lower(text: str) -> str:
    """Lowercase with all whitespace and ``_`` removed (Visual-RFT's normalisation).

    The reference removed only ' '; we remove every whitespace character because answer
    spans may now contain newlines. Plain spaces go first with ``replace`` (one C pass) so
    the ``split`` only sees the rarer tabs/newlines, which keeps a megabyte of prose fast.
    """
    t = text.replace(" ", "").replace("_", "")
    return "".join(t.split()).lower()


# --- boxes given as solutions (our data: malformed ones raise) -----------------------------


def _is_number(x: Any) -> bool:
    t = type(x)
    if t is int or t is float:  # fast path; the ABC check below is ~10x slower
        return True
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _as_seq(value: Any) -> Sequence[Any] | None:
    """A list/tuple as is; another sized iterable (e.g. a numpy array) as a list; else None."""
    if type(value) is list or type(value) is tuple:
        return value
    if isinstance(value, (str, bytes, Mapping)):  # iterable, but not a sequence of values
        return None
    if not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        return None
    return list(value)


def as_box(value: Any, what: str = "box") -> Box:
    """Validate one ground-truth ``[x1, y1, x2, y2]`` and put its corners in order."""
    v = _as_seq(value)
    if v is None or len(v) != 4:
        raise ValueError(f"{what} must be [x1, y1, x2, y2] (4 numbers), got {value!r}")
    a, b, c, d = v
    if not (_is_number(a) and _is_number(b) and _is_number(c) and _is_number(d)):
        raise ValueError(f"{what} must hold 4 numbers, got {value!r}")
    x1, y1, x2, y2 = float(a), float(b), float(c), float(d)
    if not (math.isfinite(x1) and math.isfinite(y1) and math.isfinite(x2) and math.isfinite(y2)):
        raise ValueError(f"{what} must hold 4 finite numbers, got {value!r}")
    # Ordering our own data is harmless; predictions are ordered (or not) per reward spec.
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def as_boxes(value: Any, *, allow_empty: bool, what: str = "solution") -> list[Box]:
    """Validate a ground-truth box list. A single flat box ``[x1, y1, x2, y2]`` is accepted too."""
    v = _as_seq(value)
    if v is None:
        raise ValueError(f"{what} must be a list of [x1, y1, x2, y2] boxes, got {value!r}")
    if len(v) == 4 and all(_is_number(x) for x in v):
        return [as_box(v, what)]
    if not v and not allow_empty:
        raise ValueError(f"{what} must hold at least one [x1, y1, x2, y2] box, got {value!r}")
    return [as_box(b, f"{what}[{k}]") for k, b in enumerate(v)]


class SolutionCache:
    """Validate each distinct solution object once per batch (a group of G completions shares one)."""

    __slots__ = ("_fn", "_seen")

    def __init__(self, fn: Any):
        self._fn = fn
        self._seen: dict[int, Any] = {}

    def __call__(self, sol: Any) -> Any:
        # Keyed by id; the cached entry holds `sol` itself so the id cannot be reused by a
        # temporary (e.g. rows of an array-like) while the cache lives.
        hit = self._seen.get(id(sol))
        if hit is None or hit[0] is not sol:
            hit = self._seen[id(sol)] = (sol, self._fn(sol))
        return hit[1]


# --- boxes in model text (never raise) -------------------------------------------------------

_NUM = r"(\d++(?:\.\d++)?+)"
_SEP = r"\s*+,\s*+"
# `[x1, y1, x2, y2]` (VLM-R1 REC). An attempt starting at `[` stops at the first char that
# is not part of a box, and no `[` can sit inside a box, so each char is scanned at most once.
_SQUARE_BOX = re.compile(r"\[\s*+" + _NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM + r"\s*+\]")
# `(x1,y1),(x2,y2)` (LISA grounding). An attempt can run into the next `(` group, so each char
# is scanned at most twice: still linear.
_POINT = r"\(\s*+" + _NUM + _SEP + _NUM + r"\s*+\)"
_POINT_PAIR = re.compile(_POINT + _SEP + _POINT)


def _floats(groups: Sequence[str]) -> Box | None:
    if any(len(g) > MAX_NUMBER_CHARS for g in groups):
        return None
    x1, y1, x2, y2 = (float(g) for g in groups)
    return (x1, y1, x2, y2)


def find_square_box(text: str) -> Box | None:
    """First ``[x1, y1, x2, y2]`` in ``text``, corners as written, or None."""
    if "]" not in text:  # cheap necessary condition: `[` * 10**6 costs one memchr
        return None
    m = _SQUARE_BOX.search(text)
    return None if m is None else _floats(m.groups())


def find_point_pair(text: str) -> Box | None:
    """First ``(x1,y1),(x2,y2)`` in ``text`` as ``(x1, y1, x2, y2)``, corners as written, or None."""
    if ")" not in text:
        return None
    m = _POINT_PAIR.search(text)
    return None if m is None else _floats(m.groups())


def order_corners(b: Box) -> Box:
    x1, y1, x2, y2 = b
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
