"""The run's metrics sink: one JSON object per step appended to run_dir/metrics.jsonl, the source of truth;
TensorBoard events and the curves.png are views of it that can always be rebuilt from the file."""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"

# (panel title, which keys it draws, markers): markers for sparse series, where a bare line would hide single points.
PANELS: list[tuple[str, Callable[[str], bool], bool]] = [
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


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _jsonable(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null. 0-d tensors / numpy scalars become Python numbers."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _parse_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("%s:%d: dropping line that is not valid JSON (%s)", path, lineno, e)
                continue
            if not isinstance(row, dict):
                log.warning("%s:%d: dropping line that is not a JSON object", path, lineno)
                continue
            rows.append(row)
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """Parse a metrics.jsonl; bad lines (e.g. half-written at a crash) are skipped with a warning naming the line."""
    return _parse_lines(Path(path))


def _atomic_write_lines(path: Path, rows: list[dict]) -> None:
    # tmp + os.replace: a crash mid-rewrite leaves either the old or the new file, never a truncated one
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["step"], r[key]) for r in rows if _is_number(r.get("step")) and _finite(r.get(key)))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Draw one figure with a panel per known metric group present in `rows`; returns `out_png`."""
    # Figure + FigureCanvasAgg directly, not pyplot: no global backend switch, no display, safe off the main thread
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and _finite(v)})
    panels = [(name, [k for k in keys if pick(k)], markers) for name, pick, markers in PANELS]
    panels = [p for p in panels if p[1]]
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.8 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    if not panels:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", fontsize=14)
    for i, (name, panel_keys, markers) in enumerate(panels, 1):
        ax = fig.add_subplot(nrows, ncols, i)
        for key in panel_keys:
            xs, ys = _series(rows, key)
            # a lone point drawn as a line is invisible (e.g. the first step): give it a marker
            ax.plot(xs, ys, marker="o" if markers or len(xs) == 1 else None, markersize=4, linewidth=1.2, label=key)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel_keys) > 1:
            ax.legend(fontsize=7)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")  # a viewer never sees a half-written PNG
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png


def plot_histogram(counts: dict[int, int], out_png: str | Path, title: str, xlabel: str) -> Path:
    """A bar chart of integer-keyed counts (e.g. the staleness of every trained group), each bar labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    fig = Figure(figsize=(4.8, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = sorted(counts)
    bars = ax.bar([str(k) for k in keys], [counts[k] for k in keys], color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    tmp = out_png.with_name(out_png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png


class MetricsLogger:
    """Appends one row per step to run_dir/metrics.jsonl and mirrors numeric values to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None,
                 filename: str = METRICS_FILE, keep_rows: bool = True) -> None:
        """keep_rows=False: a write-only log (no curves.png, rows not held in memory), e.g. the trained-ids audit."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        self._keep = keep_rows
        self._rows: list[dict] = _parse_lines(self.path) if self.path.exists() else []
        if resume_step is not None:
            # steps after the checkpoint will be redone: drop them so they are not shown twice
            self._rows = [r for r in self._rows if _is_number(r.get("step")) and r["step"] <= resume_step]
            _atomic_write_lines(self.path, self._rows)
        if not keep_rows:
            self._rows = []
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_mid_line(self.path):
            self._file.write("\n")  # a crash mid-line: keep the next row off the broken one
        self._closed = False
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes TensorBoard hide the old run's events past the checkpoint, like the jsonl truncation
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def log(self, row: dict) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger is closed")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"metrics row needs an int 'step', got {step!r}")
        clean = _jsonable(row)
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()  # a crash loses at most the row being written
        if self._keep:
            self._rows.append(clean)
        if self._tb is not None:
            # non-finite values are null in the jsonl (missing), so the TensorBoard view skips them too
            for key, value in clean.items():
                if key != "step" and _finite(value):
                    self._tb.add_scalar(key, value, global_step=step)

    def plot(self) -> Path:
        return plot_curves(self._rows, self.run_dir / PLOT_FILE, title=self.run_dir.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        self._file.close()
        if self._keep:
            self.plot()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
