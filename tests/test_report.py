"""`clsrl report`: run directories written by hand in the shapes a real run leaves (metrics.jsonl rows, eval
answers, config.yaml, staleness.json, driver.log), then the markdown's tables and values and the PNGs it
links."""
from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from commands.cli import main
from commands.report import build_report, md_cell
from telemetry.plots import MAX_BARS, Panel, plot_panels, plot_stage_times
from telemetry.tables import md_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = ["red", "green", "blue", "yellow"]  # two eval answers per class
DIGITS = ["zero", "one"]
# right answers per class (of 2) at each eval step
SHAPES_RIGHT = {0: {"red": 2}, 2: {"red": 2, "green": 2}, 4: {"red": 2, "green": 2, "blue": 2, "yellow": 1},
                6: {"red": 2, "green": 2, "blue": 2}}  # 0.25, 0.5, 0.875 (best), 0.75
DIGITS_RIGHT = {0: {}, 2: {"zero": 1}, 4: {"zero": 2}, 6: {"zero": 2, "one": 1}}  # 0.0, 0.25, 0.5, 0.75


def _config(datasets: list[str], steps: int, beta: float) -> dict:
    """The parts of a real config.yaml the report reads, nested the same way."""
    tasks = {"shapes": {"prompt": "no_think",
                        "rewards": [{"name": "cls_equality", "weight": 1.0, "params": {}}],
                        "correct_reward": "cls_equality"},
             "digits": {"prompt": "cls_rl",
                        "rewards": [{"name": "format", "weight": 1.0, "params": {}},
                                    {"name": "cls_accuracy", "weight": 1.0, "params": {}}],
                        "correct_reward": "cls_accuracy"}}
    cfg = {"model": {"path": None, "tiny": {"hidden_size": 128, "num_hidden_layers": 2}},
           "data": {"bundled": "shapes", "root": None, "name": None, "eval_limit": 16},
           "task": tasks["shapes"],
           "datasets": [], "sampling": {"n": 4, "max_new_tokens": 24, "temperature": 1.0},
           "algorithm": {"beta": beta, "clip_low": 0.2, "clip_high": 0.2, "loss_agg": "seq-mean-token-mean"},
           "learner": {"lr": 0.001, "zero_stage": 2}, "rollout": {"max_staleness": 1},
           "cluster": {"rollout_workers": 2, "learner_ranks": 2},
           "train": {"steps": steps, "prompts_per_step": 6, "warm_start_steps": 30, "eval_every": 2}}
    if len(datasets) > 1:
        cfg["datasets"] = [{"weight": w, "task": tasks[n],
                            "data": {"bundled": n, "root": None, "name": None, "eval_limit": 8}}
                           for n, w in zip(datasets, (2.0, 1.0))]
    return cfg


def _answers(dataset: str, step: int) -> list[dict]:
    classes, right = (SHAPES, SHAPES_RIGHT) if dataset == "shapes" else (DIGITS, DIGITS_RIGHT)
    out = []
    for c, cls in enumerate(classes):
        for i in range(2):
            ok = i < right[step].get(cls, 0)
            said = cls if ok else classes[(c + 1) % len(classes)]
            text = said if dataset == "shapes" else \
                f"<think> it | looks *like* {said}\n</think><answer>{said}</answer>"
            out.append({"dataset": dataset, "prompt_id": f"{dataset}/{dataset}-{c * 2 + i:05d}", "text": text,
                        "solution": cls, "correct": float(ok)})
    return out


def _accuracy(dataset: str, step: int) -> float:
    answers = _answers(dataset, step)
    return sum(a["correct"] for a in answers) / len(answers)


def _row(step: int, datasets: list[str], kl: bool) -> dict:
    """A metrics.jsonl step row with the keys a real run writes."""
    row = {"step": step, "reward/mean": 0.1 * step, "reward/std": 0.2, "length/mean": 8.0 + step,
           "length/max": 24, "length/truncated": 0.1, "dropped/filtered": 0, "rollout/partial_frac": 0.0,
           "rollout/span_max": 0, "reward/cls_equality": 0.1 * step, "time/generate": 0.2,
           "time/reward": 0.01, "time/publish": 0.003, "pg_loss": 0.01, "clip_frac_low": 0.0,
           "clip_frac_high": 0.01, "clip_frac": 0.01, "ratio_mean": 1.0, "entropy": 4.2, "logprob_gap": 2e-7,
           "grad_norm": 0.5, "lr": 0.001, "time/take": 0.2, "time/train_step": 0.4, "staleness/mean": 0.5,
           "staleness/max": 1, "dropped/stale": 0, "dropped/duplicate": 0, "buffer/depth": 0,
           "time/step": 0.7, "time/train_wait": 0.68, "time/sync": 0.02, "sync/mb_per_s": 160.0,
           "sync/mb": 2.27}
    if kl:
        row["kl"] = 0.001 * step
    if len(datasets) > 1:
        row.update({"reward/format": 0.5, "reward/cls_accuracy": 0.05 * step,
                    "reward/shapes/mean": 0.1 * step, "reward/shapes/cls_equality": 0.1 * step,
                    "reward/digits/mean": 0.3,
                    "reward/digits/format": 0.5, "reward/digits/cls_accuracy": 0.05 * step})
    row.update({f"data/{n}/epoch": step / 32 for n in datasets})
    return row


def _eval_row(step: int, datasets: list[str]) -> dict:
    accs = {n: _accuracy(n, step) for n in datasets}
    row = {"eval/accuracy": sum(accs.values()) / len(accs), "time/eval": 0.2}
    if len(datasets) > 1:
        row.update({f"eval/{n}/accuracy": a for n, a in accs.items()})
    return row


def write_run(run_dir, datasets=("shapes", "digits"), steps=6, last_step=None, kl=True, staleness=True):
    """A run directory as cluster/driver.py leaves it, up to `last_step` (a crash when < steps)."""
    datasets, last = list(datasets), steps if last_step is None else last_step
    run_dir.mkdir(parents=True)
    config = _config(datasets, steps, 0.01 if kl else 0.0)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = [{"step": 0, **_eval_row(0, datasets)}]
    for step in range(1, last + 1):
        rows.append({**_row(step, datasets, kl), **(_eval_row(step, datasets) if step % 2 == 0 else {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "eval").mkdir()
    for step in range(0, last + 1, 2):
        answers = [a for n in datasets for a in _answers(n, step)]
        (run_dir / "eval" / f"step-{step:06d}.jsonl").write_text(
            "".join(json.dumps(a) + "\n" for a in answers))
    if staleness:
        (run_dir / "staleness.json").write_text(json.dumps({"0": 20, "1": 16}))
    (run_dir / "driver.log").write_text(
        "2026-11-21 11:55:40,482 INFO clsrl [19506]: data: shapes, 4 classes, 192 train / 16 test prompts\n"
        "2026-11-21 11:56:44,139 INFO clsrl [19506]: step 1: {\"reward/mean\": 0.0}\n"
        "2026-11-21 11:57:10,482 INFO clsrl [19506]: checkpoint /x/checkpoints/step-000006 (0.1s)\n")
    return run_dir


def table_rows(md: str, first_header: str) -> list[list[str]]:
    """The body cells of the first table whose header starts with `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def linked_images(md_path) -> list:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    for link in links:
        assert not link.startswith("/") and "://" not in link  # relative: renders on GitHub
        data = (md_path.parent / link).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, link
    return links


def test_multi_dataset_report(tmp_path):
    md_path = build_report(write_run(tmp_path / "run"))
    assert md_path == tmp_path / "run" / "report" / "report.md"
    md = md_path.read_text()
    assert md.startswith("# Run report: run\n")
    assert [r[:2] for r in table_rows(md, "data set")] == [["shapes", "2 (67%)"], ["digits", "1 (33%)"]]
    assert ["`algorithm.beta`", "0.01"] in table_rows(md, "setting")
    assert "**steps logged**: 6 (complete)" in md and "**wall time**: 90 s" in md
    assert table_rows(md, "held-out accuracy") == [
        ["shapes", "0.250", "0.750", "+0.500", "0.875 (step 4)"],
        ["digits", "0.000", "0.750", "+0.750", "0.750 (step 6)"],
        ["overall (mean of data sets)", "0.125", "0.750", "+0.625", "0.750 (step 6)"]]
    assert table_rows(md, "step") == [
        ["0", "0.250 (8)", "0.000 (4)", "0.125"], ["2", "0.500 (8)", "0.250 (4)", "0.375"],
        ["4", "0.875 (8)", "0.500 (4)", "0.688"], ["6", "0.750 (8)", "0.750 (4)", "0.750"]]
    shapes_classes = md.split("#### shapes: 4 classes")[1]
    digits_classes = md.split("#### digits: 2 classes")[1]
    assert table_rows(shapes_classes, "class") == [
        ["blue", "2", "2", "1.000", "0.000", "blue (2×)"],
        ["green", "2", "2", "1.000", "0.000", "green (2×)"],
        ["red", "2", "2", "1.000", "1.000", "red (2×)"],
        ["yellow", "2", "0", "0.000", "0.000", "red (2×)"]]
    assert table_rows(digits_classes, "class") == [["one", "2", "1", "0.500", "0.000", "one (1×)"],
                                                   ["zero", "2", "2", "1.000", "0.000", "zero (2×)"]]
    examples = table_rows(md.split("### Example answers")[1].split("#### digits")[1], "prompt")
    assert [e[3] for e in examples] == ["1", "1", "1", "0"]  # the right ones, then the wrong one
    assert examples[3][:2] == ["digits/digits-00003", "one"]
    # an answer's markup cannot break the table or vanish as an HTML tag
    assert examples[3][2] == (r"&lt;think&gt; it \| looks \*like\* zero &lt;/think&gt;"
                              r"&lt;answer&gt;zero&lt;/answer&gt;")
    images = linked_images(md_path)
    assert images == ["reward.png", "accuracy.png", "length.png", "kl.png", "clip.png", "learner.png",
                      "timings.png", "staleness.png"]
    assert "Skipped" not in md and "## Notes" not in md


def test_single_dataset_without_kl_or_staleness(tmp_path):
    md_path = build_report(write_run(tmp_path / "run", datasets=["shapes"], kl=False, staleness=False))
    md = md_path.read_text()
    assert table_rows(md, "held-out accuracy") == [["shapes", "0.250", "0.750", "+0.500", "0.875 (step 4)"]]
    assert table_rows(md, "step")[2] == ["4", "0.875 (8)"]
    assert ("_Skipped: no KL values in metrics.jsonl (algorithm.beta = 0: no reference model, no KL "
            "term)._") in md
    assert "_Skipped: no staleness.json" in md
    assert "kl.png" not in linked_images(md_path) and not (md_path.parent / "kl.png").exists()
    assert "overall (mean" not in md


def test_crashed_half_run(tmp_path):
    """Stopped at step 4 of 10: the eval of step 4 was written, its metrics row only half; no
    staleness.json."""
    run = write_run(tmp_path / "run", datasets=["shapes"], steps=10, last_step=4, staleness=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # the crash mid-write
    md_path = build_report(run)
    md = md_path.read_text()
    assert "**steps logged**: 3 of 10 planned: **incomplete**" in md
    assert [r[0] for r in table_rows(md, "step")] == ["0", "2", "4"]  # step 4 from its eval file
    assert table_rows(md, "held-out accuracy") == [["shapes", "0.250", "0.875", "+0.625", "0.875 (step 4)"]]
    assert "metrics.jsonl: skipped 1 lines" in md
    assert "Per-class accuracy at the final eval (step 4)" in md
    assert len(linked_images(md_path)) == 7  # every curve but the staleness histogram


def test_eval_files_of_an_attempt_before_resume_are_not_shown(tmp_path):
    """Resumed from step 2 and crashed again at step 3: the step-4 and step-6 evals are the earlier
    attempt's."""
    run = write_run(tmp_path / "run", datasets=["shapes"], steps=6, staleness=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    old = (run / "config.yaml").stat().st_mtime - 60  # written before the resumed attempt rewrote config.yaml
    for step in (4, 6):
        os.utime(run / "eval" / f"step-{step:06d}.jsonl", (old, old))
    # steps 0-3: what the resumed attempt kept and wrote
    (run / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    md = build_report(run).read_text()
    assert [r[0] for r in table_rows(md, "step")] == ["0", "2"]
    assert "Per-class accuracy at the final eval (step 2)" in md
    assert "eval/step-000004.jsonl: left by an attempt before a --resume" in md.replace("\\", "")


def test_run_dir_with_no_results_yet(tmp_path):
    """Crashed before the step-0 eval: config.yaml and an empty eval/ only. Every part is skipped, with a
    note."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(["shapes"], 6, 0.0)))
    md_path = build_report(run, tmp_path / "elsewhere")
    md = md_path.read_text()
    assert md_path == tmp_path / "elsewhere" / "report.md"
    assert "**steps logged**: none" in md
    assert "_Skipped: no held-out accuracy in metrics.jsonl or eval/._" in md
    assert md.count("_Skipped: ") == 10 and linked_images(md_path) == []


def test_cli_report(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "report.md")
    assert len(linked_images(run / "report" / "report.md")) == 8
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Run report: run\n")

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / "not-a-run")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("text, cell", [("", "*(empty)*"), ("a|b", r"a\|b"),
                                        ("<b>x</b>", "&lt;b&gt;x&lt;/b&gt;"), ("two\nlines", "two lines"),
                                        ("x" * 10, "xxxx…")])
def test_md_cell(text, cell):
    assert md_cell(text, cut=4 if len(text) == 10 else None) == cell


def test_md_table_aligns_by_letter_and_the_last_letter_holds():
    table = md_table(["a", "b", "c"], [["x", 1, 2.5]], "lr")
    assert table == "| a | b | c |\n|---|---:|---:|\n| x | 1 | 2.5 |"
    assert md_table(["a", "b"], []) == "| a | b |\n|---|---|"
    with pytest.raises(ValueError, match="letters l and r"):
        md_table(["a"], [], "c")


def test_figures_without_their_keys_are_not_drawn_and_long_runs_stack_as_areas(tmp_path):
    rows = [_row(step, ["shapes"], kl=False) for step in range(1, MAX_BARS + 50)]  # areas, not 349 bars
    assert plot_panels(rows, [Panel("KL", ["kl"])], tmp_path / "kl.png") is None
    assert not (tmp_path / "kl.png").exists()
    png = plot_stage_times(rows, tmp_path / "timings.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert plot_stage_times([{"step": 1, "reward/mean": 0.5}], tmp_path / "none.png") is None
