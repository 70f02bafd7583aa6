"""`clsrl transfer`: the CLS-RL "free lunch" matrix. Train on each data set alone (or take finished
checkpoints), evaluate every trained model on every data set, and draw accuracy change against the zero-shot
model as a trained-on x tested-on heatmap (transfer.png), with the numbers in transfer.csv and transfer.md.

Every run starts from the same model: `model.path`, or for the tiny model one build whose vocabulary covers
all the data sets, after one shared format warm start when `train.warm_start_steps` is set (so "zero-shot" is
the model every run starts from, and the per-run warm start is off). The runs train first; one set of eval
engines then answers for the zero-shot model and each trained one in turn, loading each checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from commands.evaluation import eval_workers, resolve_model, run_eval
from learner.warm_start import format_warm_start
from protocol.config import ExperimentConfig
from tasks.data import load_run_data
from telemetry.tables import md_table


def _with(cfg: ExperimentConfig, **sections) -> ExperimentConfig:
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict)
                                       else v for k, v in sections.items()})


def run_transfer(cfg: ExperimentConfig, out_dir: str | Path, checkpoints: dict[str, str] | None = None,
                 protocol: str | None = None) -> dict:
    from cluster.driver import train

    out_dir, checkpoints = Path(out_dir), dict(checkpoints or {})
    entries = cfg.dataset_entries()
    data = load_run_data(cfg)
    names = list(data.tasks)
    if len(names) < 2:
        raise ValueError(f"transfer needs a config with a `datasets` list of at least 2 data sets, "
                         f"got {names}")
    if unknown := set(checkpoints) - set(names):
        raise ValueError(f"checkpoints given for unknown data sets {sorted(unknown)}; the config has {names}")
    start = data.model_path
    if cfg.train.warm_start_steps:
        t, prompts = cfg.train, {n: task.prompt for n, task in data.tasks.items()}
        start = str(format_warm_start(start, out_dir / "warm_start", data.train_examples, prompts,
                                      t.warm_start_steps, t.warm_start_lr, t.prompts_per_step, t.seed,
                                      cfg.model.trust_remote_code))
    base = _with(cfg, model={"path": start}, train={"warm_start_steps": 0})
    models = {}
    for name, entry in zip(names, entries):  # every training run first: the eval engines then start once
        if name in checkpoints:
            models[name] = str(resolve_model(checkpoints[name]))
        else:
            run_dir = out_dir / "runs" / name
            train(dataclasses.replace(base, datasets=[entry]), run_dir)
            models[name] = str(resolve_model(run_dir))
    with eval_workers(base, dataclasses.replace(data, model_path=start), protocol) as workers:
        zero_shot = run_eval(base, out_dir / "zero_shot", protocol, workers=workers)
        evals = {name: run_eval(_with(base, model={"path": models[name]}), out_dir / "eval" / name, protocol,
                                workers=workers) for name in names}
    acc0 = {n: zero_shot["datasets"][n]["accuracy"] for n in names}
    accuracy = {t: {s: evals[t]["datasets"][s]["accuracy"] for s in names} for t in names}
    delta = {t: {s: accuracy[t][s] - acc0[s] for s in names} for t in names}
    result = {"datasets": names, "zero_shot": acc0, "models": models, "accuracy": accuracy, "delta": delta}
    (out_dir / "transfer.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trained on \\ tested on", *names])
        w.writerows([[t, *(f"{100 * delta[t][s]:.2f}" for s in names)] for t in names])
        w.writerow(["zero-shot accuracy", *(f"{100 * acc0[s]:.2f}" for s in names)])
    plot_heatmap(delta, names, out_dir / "transfer.png")
    (out_dir / "transfer.md").write_text(markdown(result))
    return result


def plot_heatmap(delta: dict, names: list[str], out_png: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = [[100 * delta[t][s] for s in names] for t in names]
    span = max(1.0, max(abs(v) for row in grid for v in row))
    fig = Figure(figsize=(1.2 * len(names) + 2.4, 1.0 * len(names) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span)  # red: worse than zero-shot, blue: better
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(v) > span / 2 else "black")
    fig.colorbar(image, ax=ax, label="accuracy change vs zero-shot (points)")
    ax.set_title("free lunch: accuracy change after RL on one data set", fontsize=10)
    fig.savefig(out_png, format="png", dpi=110)
    return out_png


def markdown(result: dict) -> str:
    names, delta, acc0 = result["datasets"], result["delta"], result["zero_shot"]
    rows = [[t, *(f"{100 * delta[t][s]:+.2f}" for s in names)] for t in names]
    rows.append(["*zero-shot accuracy*", *(f"{100 * acc0[s]:.2f}" for s in names)])
    return ("![transfer heatmap](transfer.png)\n\nAccuracy change against the zero-shot model, in points "
            "(rows: trained on, columns: tested on).\n\n"
            + md_table(["trained on", *names], rows, "lr") + "\n")
