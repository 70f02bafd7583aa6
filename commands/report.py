"""`clsrl report RUN_DIR`: a markdown report of a run with PNG curves and eval tables, readable without
TensorBoard.

Everything comes from the files a run leaves behind (metrics.jsonl, eval/step-*.jsonl, config.yaml,
staleness.json, driver.log), so it works on a finished run, a crashed one and one still running. A part whose
inputs are missing is skipped with a note in its place; only a missing or non-run RUN_DIR is an error.
The .md and its PNGs share one folder, so the image links are plain file names and render on GitHub."""
from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path

from commands.report_data import (
    Run,
    accuracy_by_step,
    config_datasets,
    config_get,
    dataset_names,
    dataset_of,
    eval_scores,
    group_by,
    load_run,
)
from rewards.parsing import extract_answer, words_lower
from telemetry.collapse import ENTROPY_FLAG, NO_SIGNAL_FLAG, no_signal_share, replay
from telemetry.plots import Panel, finite, plot_panels, plot_stage_times
from telemetry.tables import md_table

REPORT_DIR = "report"
REPORT_FILE = "report.md"
EXAMPLES = 3  # right and wrong answers shown per data set
TEXT_CUT = 160  # characters of an answer shown in the examples
HYPERPARAMETERS = ("train.steps", "train.prompts_per_step", "sampling.n", "sampling.max_new_tokens",
                   "sampling.temperature", "learner.lr", "learner.zero_stage", "algorithm.beta",
                   "algorithm.clip_low", "algorithm.clip_high", "algorithm.loss_agg",
                   "algorithm.dynamic_sampling", "rollout.max_staleness", "rollout.partial_rollout",
                   "train.warm_start_steps", "train.seed", "cluster.rollout_workers", "cluster.learner_ranks")


def md_cell(text: object, cut: int | None = None) -> str:
    """Text safe inside a table cell: no HTML (a <think> tag would vanish), no markup, no pipes, no line
    breaks."""
    s = str(text)
    if cut and len(s) > cut:
        s = s[:cut] + "…"
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = re.sub(r"([\\`*_\[\]|])", r"\\\1", s)
    return " ".join(s.split()) or "*(empty)*"


def table(header: list[str], rows: list[list[object]]) -> str:
    """A report block: the table and its closing newline."""
    return md_table(header, rows) + "\n"


def _acc(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _num(v: object) -> str:
    return f"{v:g}" if finite(v) else str(v)


def rewards(entry: dict) -> list[dict]:
    terms = entry["task"].get("rewards")
    return [t for t in terms if isinstance(t, dict)] if isinstance(terms, list) else []


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def header_section(run: Run, names: list[str]) -> str:
    cfg, path = run.config, run.path.resolve()
    out = [f"# Run report: {path.name}\n\n", f"Run directory: `{path}`\n\n"]
    if cfg is None:
        out.append("_No readable config.yaml: the configuration is not shown._\n")
    else:
        model = config_get(cfg, "model.path")
        tiny = config_get(cfg, "model.tiny") or {}
        out.append(f"- **model**: `{model}`\n" if model else "- **model**: tiny offline Qwen2-VL (hidden "
                   f"{tiny.get('hidden_size', '?')}, {tiny.get('num_hidden_layers', '?')} layers, built "
                   "locally)\n")
        entries = config_datasets(cfg)
        total = sum(float(e["weight"]) for e in entries) or 1.0
        out.append("\n" + table(["data set", "weight (share)", "source", "prompt", "rewards (weight)",
                                  "eval limit"], [[
            md_cell(e["name"]), f"{e['weight']:g} ({float(e['weight']) / total:.0%})",
            md_cell(e["data"].get("root") or f"bundled {e['data'].get('bundled')}"),
            md_cell(e["task"].get("prompt", "?")),
            md_cell(", ".join(f"{t.get('name')} ({_num(t.get('weight', 1.0))})" for t in rewards(e))),
            e["data"].get("eval_limit") or "all"] for e in entries]))
        params = [(k, config_get(cfg, k)) for k in HYPERPARAMETERS if config_get(cfg, k) is not None]
        out.append("\n" + table(["setting", "value"], [[f"`{k}`", md_cell(v)] for k, v in params]))
    steps = [r["step"] for r in run.rows]
    planned = config_get(cfg, "train.steps")
    if steps:
        last = max(steps)
        state = "" if planned is None else " (complete)" if last >= planned else \
            f" of {planned} planned: **incomplete** (the run stopped early or is still running)"
        out.append(f"\n- **steps logged**: {last}{state}\n")
    else:
        out.append("\n- **steps logged**: none (no metrics.jsonl rows)\n")
    loop = sum(r.get(k, 0) for r in run.rows for k in ("time/step", "time/eval") if finite(r.get(k)))
    if run.log_span_s is not None:
        out.append(f"- **wall time**: {_duration(run.log_span_s)} from the first to the last driver.log line "
                   "(includes the warm start and any pause before a resume)\n")
    if loop:
        out.append(f"- **GRPO loop time**: {_duration(loop)} (sum of time/step and time/eval)\n")
    return "".join(out)


def summary_section(acc: dict[int, dict[str, float]], names: list[str]) -> str:
    out = ["## Summary\n\n"]
    if not acc:
        return out[0] + "_Skipped: no held-out accuracy in metrics.jsonl or eval/._\n"
    first, last = min(acc), max(acc)
    if first != 0:
        out.append(f"_No step-0 eval: the first eval (step {first}) stands in for the GRPO start._\n\n")
    rows = []
    for key in (names + ["overall"] if len(names) > 1 else ["overall"]):
        pts = [(s, a[key]) for s, a in acc.items() if key in a]
        if not pts:
            continue
        best = max(pts, key=lambda p: (p[1], -p[0]))
        start, end = acc[first].get(key), acc[last].get(key)
        change = f"{end - start:+.3f}" if start is not None and end is not None else "–"
        label = "overall (mean of data sets)" if key == "overall" and len(names) > 1 else \
            md_cell(names[0] if key == "overall" and names else key)
        rows.append([label, _acc(start), _acc(end), change, f"{best[1]:.3f} (step {best[0]})"])
    out.append(table(["held-out accuracy", f"GRPO start (step {first})", f"end (step {last})", "change",
                      "best (step)"], rows))
    return "".join(out)


def health_section(run: Run) -> str | None:
    """Did GRPO keep learning: the collapse warnings the run's metrics give (telemetry/collapse.py, replayed,
    so runs from before the flags were logged get them too). None for a run without GRPO learner rows."""
    rows = [r for r in run.rows if finite(r.get("entropy")) or no_signal_share(r) is not None]
    if not rows:
        return None
    out = ["## Training health\n\n"]
    window = ((run.config or {}).get("train") or {}).get("collapse_window")
    # the run's own window; the default one for a config without it (or with a bad one)
    warnings = replay(run.rows, **({"window": window} if isinstance(window, int) and window >= 1 else {}))
    flagged = sum(bool(r.get(ENTROPY_FLAG) or r.get(NO_SIGNAL_FLAG)) for r in run.rows)
    out += [f"- **collapse warning**: {md_cell(w)}\n" for w in warnings]
    if flagged:  # the run's own flags
        out.append(f"- **steps flagged as collapsed while training**: {flagged}\n")
    elif not warnings:
        out.append("- no collapse detected\n")
    last = rows[-1]
    for key, label in (("entropy", "entropy"), ("groups/equal_rewards", "groups with all rewards equal"),
                       ("groups/filtered", "groups dropped by dynamic sampling"),
                       ("groups/one_wrong_answer", "groups all wrong with one repeated answer")):
        if finite(last.get(key)):
            out.append(f"- {label} at step {last['step']}: {last[key]:.3f}\n")
    diversity = [r for r in run.rows if finite(r.get("eval/answer_diversity"))]
    if diversity:
        (a, b), key = (diversity[0], diversity[-1]), "eval/answer_diversity"
        out.append(f"- answer diversity (distinct greedy answers / classes): {a[key]:.2f} at step "
                   f"{a['step']}, {b[key]:.2f} at step {b['step']}\n")
    return "".join(out)


def figures_section(run: Run, names: list[str], out_dir: Path) -> str:
    from telemetry.plots import plot_histogram

    rows, multi = run.rows, len(names) > 1
    comps = sorted({k for r in rows for k in r if k.startswith("reward/") and k.count("/") == 1}
                   - {"reward/mean", "reward/std"})
    reward = [Panel("reward, all data sets" if multi else "reward", ["reward/mean"] + comps,
                    band=("reward/mean", "reward/std"),
                    labels={k: k.removeprefix("reward/") for k in ["reward/mean"] + comps})]
    for n in names if multi else []:
        keys = sorted({k for r in rows for k in r if k.startswith(f"reward/{n}/")},
                      key=lambda k: (not k.endswith("/mean"), k))
        reward.append(Panel(f"reward, {n}", keys, labels={k: k.removeprefix(f"reward/{n}/") for k in keys}))
    acc_keys = ["eval/accuracy"] + [f"eval/{n}/accuracy" for n in names if multi]
    acc_labels = {"eval/accuracy": "overall (mean of data sets)" if multi else "accuracy"} | \
        {f"eval/{n}/accuracy": n for n in names}
    beta = config_get(run.config, "algorithm.beta")
    kl_note = " in metrics.jsonl (algorithm.beta = 0: no reference model, no KL term)" if beta == 0 else ""
    specs = [  # (heading, file, panels, note when skipped)
        ("Reward per component", "reward.png", reward, "no reward/* values"),
        ("Held-out accuracy per data set", "accuracy.png",
         [Panel("held-out accuracy (greedy)", acc_keys, markers=True, labels=acc_labels)],
         "no eval/* values"),
        ("Completion length", "length.png", [Panel("completion tokens", ["length/mean", "length/max"]),
                                             Panel("truncated fraction", ["length/truncated"])],
         "no length/* values"),
        ("KL to the reference", "kl.png", [Panel("KL", ["kl"])], "no KL values" + kl_note),
        ("Clip fraction", "clip.png",
         [Panel("clipped token fraction", ["clip_frac", "clip_frac_low", "clip_frac_high"])],
         "no clip_frac values"),
        ("Learner statistics", "learner.png",
         [Panel(k, [k]) for k in ("pg_loss", "entropy", "grad_norm", "logprob_gap")], "no learner values"),
    ]
    out = ["## Curves\n"]
    for heading, name, panels, note in specs:
        ncols = 2 if len(panels) in (2, 4) else 3
        png = plot_panels(rows, panels, out_dir / name, ncols=ncols) if rows else None
        note = note if "metrics.jsonl" in note else note + " in metrics.jsonl"
        if png is None:
            (out_dir / name).unlink(missing_ok=True)  # an older report's picture would look current
        out.append(f"\n### {heading}\n\n"
                   + (f"![{heading}]({name})\n" if png else f"_Skipped: {note}._\n"))
    png = plot_stage_times(rows, out_dir / "timings.png") if rows else None
    out.append("\n### Stage timings\n\n" + (
        "Left: the driver's seconds per step by stage (train_wait: waiting for the learners, rollout "
        "included; sync: weight broadcast; eval: greedy eval). Right: busy seconds inside the actors "
        "(rollout stages summed over workers, learner stages averaged over ranks).\n\n"
        "![Stage timings](timings.png)\n"
        if png else "_Skipped: no time/* values in metrics.jsonl._\n"))
    out.append("\n### Staleness of trained groups\n\n")
    if run.staleness:
        plot_histogram(run.staleness, out_dir / "staleness.png", "staleness of trained groups",
                       "policy versions behind the learner")
        out.append("![Staleness of trained groups](staleness.png)\n")
    else:
        out.append("_Skipped: no staleness.json, or no groups in it (it is written when a run finishes)._\n")
    return "".join(out)


def _answer(text: str) -> str:
    return words_lower(extract_answer(text))


def _solution(answer: dict) -> str:
    return str(answer.get("solution", "?"))


def _accuracy(answers: list[dict]) -> str:
    return _acc(statistics.fmean(a["correct"] for a in answers))


def accuracy_table(run: Run, acc: dict[int, dict[str, float]], names: list[str], default: str) -> str:
    """Accuracy at every eval step, per data set with its answer count, and overall."""
    counts = {step: eval_scores(answers, default) for step, answers in run.evals.items()}

    def cell(step: int, key: str) -> str:
        n = counts.get(step, {}).get(key)
        return _acc(acc[step].get(key if len(names) > 1 else "overall")) + (f" ({n[1]})" if n else "")

    if len(names) > 1:
        return table(["step"] + [f"{md_cell(n)} (answers)" for n in names] + ["overall"],
                     [[s] + [cell(s, n) for n in names] + [_acc(acc[s].get("overall"))] for s in acc])
    return table(["step", f"{md_cell(default)} (answers)"], [[s, cell(s, default)] for s in acc])


def class_table(answers: list[dict], start: list[dict], first: int, last: int) -> str:
    """Per class (the answers' solution): accuracy at the last eval and the first, and the answer given
    most."""
    at_start = group_by(start, _solution)
    rows = []
    for cls, group in sorted(group_by(answers, _solution).items()):
        common, times = Counter(_answer(str(a.get("text", ""))) for a in group).most_common(1)[0]
        rows.append([md_cell(cls), len(group), f"{sum(a['correct'] for a in group):g}",
                     _accuracy(group), _accuracy(at_start[cls]) if cls in at_start else "–",
                     f"{md_cell(common, 40)} ({times}×)"])
    return table(["class", "answers", "correct", f"accuracy (step {last})", f"at step {first}",
                  "most frequent answer"], rows)


def examples_table(answers: list[dict]) -> str:
    right = [a for a in answers if a["correct"] > 0][:EXAMPLES]
    wrong = [a for a in answers if a["correct"] <= 0][:EXAMPLES]
    out = table(["prompt", "solution", "answer (cut)", "score"], [
        [md_cell(a.get("prompt_id", "?")), md_cell(a.get("solution", "?")),
         md_cell(a.get("text", ""), TEXT_CUT), f"{a['correct']:g}"] for a in right + wrong])
    if not right or not wrong:
        out += f"\n_No {'right' if not right else 'wrong'} answers at this eval._\n"
    return out


def eval_section(run: Run, acc: dict[int, dict[str, float]], names: list[str]) -> str:
    out = ["## Evaluation\n\n### Accuracy at each eval step\n\n"]
    if not acc:
        return out[0] + "_Skipped: no held-out accuracy in metrics.jsonl or eval/._\n"
    default = names[0] if names else "data"
    out.append(accuracy_table(run, acc, names, default))
    if not run.evals:
        return "".join(out) + ("\n_No eval/step-*.jsonl answers: the per-class table and examples are "
                               "skipped._\n")
    first, last = min(run.evals), max(run.evals)
    final, start = (group_by(run.evals[step], lambda a: dataset_of(a, default)) for step in (last, first))
    out.append(f"\n### Per-class accuracy at the final eval (step {last})\n")
    for ds, answers in final.items():
        n = len(set(map(_solution, answers)))
        out.append(f"\n#### {md_cell(ds)}: {n} class{'es' if n != 1 else ''} in the eval\n\n")
        out.append(class_table(answers, start.get(ds, []), first, last))
    out.append(f"\n### Example answers at the final eval (step {last})\n")
    for ds, answers in final.items():
        out.append(f"\n#### {md_cell(ds)}\n\n" + examples_table(answers))
    return "".join(out)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write out_dir/report.md (default RUN_DIR/report/) and its PNGs; returns the .md path."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    names = dataset_names(run)
    acc = accuracy_by_step(run, names)
    parts = [header_section(run, names), summary_section(acc, names), health_section(run),
             figures_section(run, names, out), eval_section(run, acc, names)]
    parts = [p for p in parts if p is not None]
    if run.notes:
        parts.append("## Notes\n\n" + "".join(f"- {md_cell(n)}\n" for n in run.notes))
    md = out / REPORT_FILE
    md.write_text("\n".join(parts), encoding="utf-8")
    return md
