"""The one way the project writes a markdown table (reports, eval.md, transfer.md, the benchmarks' output)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

_RULE = {"l": "---", "r": "---:"}


def md_table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "l") -> str:
    """`| a | b |` lines, no trailing newline. Cells go in as str(cell): escaping is the caller's (a `|` in
    a cell splits it). `align`: one letter per column, l(eft) or r(ight); its last letter holds for the
    columns it does not reach ("lr": first column left, the rest right, as for a label and its numbers)."""
    if not align or set(align) - set(_RULE):
        raise ValueError(f"align takes the letters l and r, got {align!r}")
    rule = "|" + "|".join(_RULE[align[min(i, len(align) - 1)]] for i in range(len(header))) + "|"
    return "\n".join([_row(header), rule, *map(_row, rows)])


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"
