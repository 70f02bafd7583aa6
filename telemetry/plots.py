"""Every PNG drawn from metrics.jsonl rows: the run's curves.png (plot_curves), the report's pictures, one
per topic (plot_panels, plot_stage_times: None when the rows hold none of their keys, so the report says so
instead of linking an empty picture) and bar charts of counts (plot_histogram).

Figure + FigureCanvasAgg, never pyplot: no global backend or figure registry, safe in any process or thread;
matplotlib is imported when a picture is drawn, so importing this module costs nothing."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Driver wall-clock seconds per step; they add up: time/step = train_wait + sync, eval comes after it.
WALL_STAGES = ("time/train_wait", "time/sync", "time/eval")
# Busy seconds inside the actors: rollout stages summed over chunks and workers, learner stages averaged
# over ranks.
MAX_BARS = 300  # more steps than this: the stacked timings become areas
BUSY_STAGES = ("time/generate", "time/reward", "time/publish", "time/take", "time/train_step")


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step, over the rows where it is a finite number."""
    pts = sorted((r["step"], r[key]) for r in rows if finite(r.get("step")) and finite(r.get(key)))
    return [p[0] for p in pts], [p[1] for p in pts]


def has_any(rows: list[dict], keys: list[str] | tuple[str, ...]) -> bool:
    return any(finite(r.get(k)) for r in rows for k in keys)


@dataclass
class Panel:
    title: str
    keys: list[str]
    markers: bool = False  # sparse series (evals): a bare line would hide single points
    band: tuple[str, str] | None = None  # (mean key, std key): shade mean +- std
    ylabel: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # key -> legend text (default: the key)


def _new_figure(n_panels: int, ncols: int = 2, width: float = 5.2, height: float = 3.3,
                title: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows))
    # fixed margins in inches, not layout="constrained": that measures every tick label and takes half of a
    # run's plotting time (about 0.8 s of the driver's CPU per run)
    w, h = width * ncols, height * nrows
    top = 0.75 if title else 0.35  # room for the figure's title above the panels' own
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.2 / w, bottom=0.5 / h, top=1 - top / h,
                        wspace=0.75 * ncols / w, hspace=0.85 * nrows / h)
    if title:
        fig.suptitle(title, fontsize=11)
    FigureCanvasAgg(fig)
    return fig, nrows, ncols


def _save(fig, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")  # a reader never sees a half-written PNG
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png


def _style(ax, title: str, ylabel: str = "", legend: bool = True, points: int = 0) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if legend and len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=7, loc="best" if points < 1000 else "upper left")  # "best" scans every point: slow


def plot_panels(rows: list[dict], panels: list[Panel], out_png: str | Path, title: str | None = None,
                ncols: int = 2) -> Path | None:
    """Line plots, one panel per Panel that has data; None (nothing written) when no panel has any."""
    panels = [p for p in panels if has_any(rows, p.keys)]
    if not panels:
        return None
    fig, nrows, ncols = _new_figure(len(panels), ncols, title=title)
    for i, panel in enumerate(panels, 1):
        ax = fig.add_subplot(nrows, ncols, i)
        if panel.band:
            (xs, mean), (xs_std, std) = series(rows, panel.band[0]), series(rows, panel.band[1])
            lookup = dict(zip(xs_std, std))
            pts = [(x, m, lookup[x]) for x, m in zip(xs, mean) if x in lookup]
            if pts:
                ax.fill_between([p[0] for p in pts], [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts],
                                alpha=0.15, linewidth=0, label=f"{panel.band[0]} ± std")
        for key in panel.keys:
            xs, ys = series(rows, key)
            if xs:  # a lone point drawn as a line is invisible: give it a marker
                ax.plot(xs, ys, marker="o" if panel.markers or len(xs) == 1 else None, markersize=4,
                        linewidth=1.3, label=panel.labels.get(key, key))
        _style(ax, panel.title, panel.ylabel, points=sum(len(series(rows, k)[0]) for k in panel.keys))
    return _save(fig, Path(out_png))


def plot_stage_times(rows: list[dict], out_png: str | Path) -> Path | None:
    """Left: the driver's wall seconds per step stacked by stage. Right: busy seconds inside the actors (they
    overlap each other and the driver's wait, so they are lines, not a stack)."""
    wall = [k for k in WALL_STAGES if has_any(rows, [k])]
    busy = [k for k in BUSY_STAGES if has_any(rows, [k])]
    busy += sorted({k for r in rows for k, v in r.items() if k.startswith("time/") and finite(v)}
                   - set(WALL_STAGES) - set(BUSY_STAGES) - {"time/step"})
    if not wall and not busy:
        return None
    fig, nrows, ncols = _new_figure(int(bool(wall)) + int(bool(busy)))
    i = 0
    if wall:
        i += 1
        ax = fig.add_subplot(nrows, ncols, i)
        steps = sorted({r["step"] for r in rows if finite(r.get("step")) and has_any([r], wall)})
        by_step = {r["step"]: r for r in rows if finite(r.get("step"))}
        stacks = [[by_step[s][key] if finite(by_step[s].get(key)) else 0.0 for s in steps] for key in wall]
        labels = [key.removeprefix("time/") for key in wall]
        if len(steps) <= MAX_BARS:
            bottom = [0.0] * len(steps)
            for vals, label in zip(stacks, labels):
                ax.bar(steps, vals, bottom=bottom, label=label, linewidth=0)
                bottom = [b + v for b, v in zip(bottom, vals)]
        else:  # thousands of bars draw slowly and blur into areas anyway
            ax.stackplot(steps, *stacks, labels=labels, linewidth=0)
        _style(ax, "driver wall seconds per step (stacked)", "seconds", points=len(steps) * len(wall))
    if busy:
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for key in busy:
            xs, ys = series(rows, key)
            ax.plot(xs, ys, marker="o" if len(xs) == 1 else None, markersize=4, linewidth=1.2,
                    label=key.removeprefix("time/"))
        _style(ax, "busy seconds per step inside the actors", "seconds", points=len(rows) * len(busy))
    return _save(fig, Path(out_png))


# curves.png: (panel title, which keys it draws, markers); markers for sparse series (evals)
CURVES: list[tuple[str, Callable[[str], bool], bool]] = [
    ("reward", lambda k: k.startswith("reward/"), False),
    ("held-out accuracy", lambda k: k.startswith("eval/") and "accuracy" in k, True),
    ("loss", lambda k: k in ("pg_loss", "loss"), False),
    ("KL", lambda k: k == "kl", False),
    ("clip fraction", lambda k: k.startswith("clip_frac"), False),
    ("completion length", lambda k: k in ("length/mean", "length/max"), False),
    ("logprob gap (engine vs learner)", lambda k: k == "logprob_gap", False),
    ("seconds per step by stage", lambda k: k.startswith("time/"), False),
    ("weight broadcast MB/s", lambda k: k == "sync/mb_per_s", False),
]


def plot_curves(rows: list[dict], out_png: str | Path, title: str | None = None) -> Path:
    """The run's overview: a panel per CURVES group present in `rows`; always writes `out_png` (a placeholder
    saying "no metrics yet" when there is nothing to draw) and returns it."""
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and finite(v)})
    panels = [Panel(name, [k for k in keys if pick(k)], markers) for name, pick, markers in CURVES]
    png = plot_panels(rows, panels, out_png, title, ncols=3)
    if png is not None:
        return png
    fig, _, _ = _new_figure(1, title=title)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", fontsize=14)
    return _save(fig, Path(out_png))


def plot_histogram(counts: dict[int, int], out_png: str | Path, title: str, xlabel: str) -> Path:
    """A bar chart of integer-keyed counts (e.g. the staleness of every trained group), each bar labelled."""
    fig, _, _ = _new_figure(1, width=4.8, height=3.2)
    ax = fig.add_subplot()
    keys = sorted(counts)
    bars = ax.bar([str(k) for k in keys], [counts[k] for k in keys], color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    return _save(fig, Path(out_png))


def plot_bands(panels: dict[str, dict[str, tuple[list[float], list[float], list[float], list[float]]]],
               out_png: str | Path, xlabel: str, ylabel: str, title: str | None = None) -> Path:
    """One panel per name in `panels`, one line per series in it: (x, mean, low, high), the low-high spread
    (e.g. over seeds) shaded around the mean."""
    fig, nrows, ncols = _new_figure(len(panels), ncols=min(3, len(panels)) or 1, width=4.4, height=3.0,
                                    title=title)
    for i, (name, lines) in enumerate(panels.items(), 1):
        ax = fig.add_subplot(nrows, ncols, i)
        for label, (x, mean, low, high) in lines.items():
            ax.plot(x, mean, marker="o", markersize=3, label=label)
            ax.fill_between(x, low, high, alpha=0.2)
        _style(ax, name, ylabel)
        ax.set_xlabel(xlabel, fontsize=8)
    return _save(fig, Path(out_png))
