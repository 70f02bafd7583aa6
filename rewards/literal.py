"""A small, linear-time parser for JSON / Python-literal lists and dicts.

Used for Visual-RFT detection answers such as
``[{'Position': [10, 20, 300, 400], 'Confidence': 0.9}, ...]``.

Why not ``json.loads(text.replace("'", '"'))`` like the reference, or ``ast.literal_eval``?
Both are all-or-nothing (we must repair a list cut off by the token limit), the quote swap
breaks on apostrophes, and deep nesting makes both recurse. This parser:
- accepts single- or double-quoted strings, numbers, true/false/null/True/False/None,
  lists and dicts, trailing commas;
- caps nesting depth (``MAX_DEPTH``) and number length, so ``[[[[...`` or a megabyte of
  digits fails fast;
- on running out of text, returns the outermost container holding only the elements
  that were complete (``complete=False``): that is the "truncated list repaired" rule;
- ignores whatever follows a complete top-level value.
Each token is matched by one anchored regex with possessive quantifiers, so the whole
parse is linear in the text.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .parsing import MAX_NUMBER_CHARS

MAX_DEPTH = 8  # detection needs 3 (list > dict > list)


class Malformed(ValueError):
    """The text is not a literal we accept."""


_TOKEN = re.compile(
    r"""\s*+(?:
        (?P<p>[\[\]{}:,])
      | (?P<s>'[^'\\]*+(?:\\.[^'\\]*+)*+'|"[^"\\]*+(?:\\.[^"\\]*+)*+")
      | (?P<n>[-+]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][-+]?+\d++)?+)
      | (?P<w>[A-Za-z_]\w*+)
    )""",
    re.VERBOSE | re.DOTALL,
)
_WORDS: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}

# parser states
_VALUE, _VALUE_OR_CLOSE, _KEY_OR_CLOSE, _COLON, _COMMA_OR_CLOSE = range(5)


def _scalar(kind: str | None, tok: str) -> Any:
    if kind == "n":
        if len(tok) > MAX_NUMBER_CHARS:
            raise Malformed("number too long")
        v = float(tok)
        if not math.isfinite(v):
            raise Malformed("non-finite number")
        return v
    if kind == "s":
        return tok[1:-1]  # escapes are kept verbatim: keys we read have none
    if tok in _WORDS:
        return _WORDS[tok]
    raise Malformed(f"unexpected token {tok[:20]!r}")


def parse_literal(text: str, pos: int = 0, max_depth: int = MAX_DEPTH) -> tuple[Any, bool]:
    """Parse one literal starting at ``pos``. Returns ``(value, complete)``; raises Malformed.

    Numbers always come back as float. When the text ends inside a container,
    ``complete`` is False and ``value`` is the outermost container with its complete
    elements only (a partial element, and anything nested in it, is dropped).
    """
    match = _TOKEN.match
    stack: list[Any] = []  # open containers, outermost first
    keys: list[Any] = []  # pending dict key per frame (None for lists)
    expect = _VALUE
    while True:
        m = match(text, pos)
        if m is None:
            rest = text[pos:].lstrip()
            # End of text, or an unclosed string that runs to the end: the text was cut off.
            if not rest or rest[0] in "'\"":
                if not stack:
                    raise Malformed("no value")
                return stack[0], False
            raise Malformed(f"unexpected text {rest[:20]!r}")
        pos = m.end()
        kind = m.lastgroup
        tok = m.group(kind)  # type: ignore[arg-type]

        if expect == _VALUE or expect == _VALUE_OR_CLOSE:
            if tok == "[" or tok == "{":
                if len(stack) >= max_depth:
                    raise Malformed("nested too deep")
                stack.append([] if tok == "[" else {})
                keys.append(None)
                expect = _VALUE_OR_CLOSE if tok == "[" else _KEY_OR_CLOSE
                continue
            if kind == "p":
                # Only a list reaches _VALUE_OR_CLOSE, so "]" closes a list here.
                if expect != _VALUE_OR_CLOSE or tok != "]":
                    raise Malformed(f"unexpected {tok!r}")
                keys.pop()
                value = stack.pop()
            else:
                value = _scalar(kind, tok)
        elif expect == _COMMA_OR_CLOSE:
            top = stack[-1]
            is_list = type(top) is list
            if tok == ",":
                expect = _VALUE_OR_CLOSE if is_list else _KEY_OR_CLOSE
                continue
            if kind != "p" or tok != ("]" if is_list else "}"):
                raise Malformed(f"unexpected {tok[:20]!r}")
            keys.pop()
            value = stack.pop()
        elif expect == _KEY_OR_CLOSE:
            if kind == "s":
                keys[-1] = tok[1:-1]
                expect = _COLON
                continue
            if tok != "}":
                raise Malformed(f"unexpected {tok[:20]!r} for a dict key")
            keys.pop()
            value = stack.pop()
        else:  # _COLON
            if tok != ":":
                raise Malformed(f"expected ':' got {tok[:20]!r}")
            expect = _VALUE
            continue

        # A value is complete: hand it to its container, or finish.
        if not stack:
            return value, True
        top = stack[-1]
        if type(top) is list:
            top.append(value)
        else:
            top[keys[-1]] = value
        expect = _COMMA_OR_CLOSE
