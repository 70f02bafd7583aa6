"""The table and the plot of bench/vs_trl.py, from its results.json report."""
from __future__ import annotations

from pathlib import Path

from telemetry.tables import md_table

# issue 7: clsrl samples/s over TRL's, by (model, system)
TARGETS = {("tiny", "clsrl-sync"): 0.8, ("small", "clsrl-sync"): 1.0, ("small", "clsrl-async"): 1.3}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(report: dict) -> str:
    header = ["model", "params", "system", "torch threads", "samples/s", "steps/s", "vs TRL", "target",
              "s/step (median)", "generate s/step", "train s/step", "startup s", "reward first -> last step",
              "accuracy start -> end", "load (1 min)"]
    rows = []
    for name, m in report["models"].items():
        for system, r in m["systems"].items():
            ratio = m["ratio_vs_trl"].get(system, 1.0)
            goal = m["targets"].get(system)
            target = "-" if goal is None else f">= {goal['target']:.1f}x {'met' if goal['met'] else '**missed**'}"
            rewards = [v for _, v in r["reward"]]
            curve = f"{rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else "-"
            threads = report["threads"][system]
            rows.append([
                name, f"{m['params_m']:.1f}M", system, threads if system == "trl" else f"{threads}/actor",
                f"{r['samples_per_s']:.1f}", f"{r['steps_per_s']:.3f}", f"{ratio:.2f}x", target,
                f"{r['measured_seconds'] / r['measured_steps']:.2f} ({r['median_step_s']:.2f})",
                _fmt(r["generate_s_per_step"]), _fmt(r["train_s_per_step"]), f"{r['startup_s']:.1f}", curve,
                f"{r['grpo_start_accuracy']:.3f} -> {r['final_accuracy']:.3f}", f"{r['loadavg_1m']['mean']:.1f}"])
    return md_table(header, rows, "lrllrrrlrrrrllr")


def plot(report: dict, out_png: Path) -> Path:
    """Top row: mean reward of each step's samples against samples trained, one line per system (equal learning
    per sample is part of the comparison); bottom row: seconds per step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = report["models"]
    fig = Figure(figsize=(6 * len(models), 7), layout="constrained")
    FigureCanvasAgg(fig)
    for col, (name, m) in enumerate(models.items()):
        ax_r = fig.add_subplot(2, len(models), col + 1)
        ax_t = fig.add_subplot(2, len(models), len(models) + col + 1)
        for system, r in m["systems"].items():
            if r["reward"]:
                xs, ys = zip(*r["reward"])
                ax_r.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=system)
            ax_t.plot(range(1, len(r["step_s"]) + 1), r["step_s"], marker="o", markersize=3,
                      label=f"{system} ({r['samples_per_s']:.0f} samples/s)")
        for ax, title, xlabel in ((ax_r, f"{name} ({m['params_m']:.1f}M): mean reward", "samples trained"),
                                  (ax_t, f"{name}: seconds per step ({m['samples_per_step']} samples)", "step")):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(out_png, format="png", dpi=90)
    return out_png
