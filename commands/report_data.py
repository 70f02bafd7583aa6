"""What a run directory says, read for the report: metrics.jsonl, eval/step-*.jsonl, config.yaml,
staleness.json and driver.log, each optional; unreadable lines are skipped and counted in Run.notes, never
fatal."""
from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from telemetry.plots import finite

_EVAL_FILE = re.compile(r"^step-(\d+)\.jsonl$")
_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", re.MULTILINE)


class RunDirError(FileNotFoundError):
    """RUN_DIR is missing or holds none of the files a run writes."""


@dataclass
class Run:
    path: Path
    config: dict | None = None
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, one per step
    evals: dict[int, list[dict]] = field(default_factory=dict)  # step -> greedy answers
    staleness: dict[int, int] | None = None
    log_span_s: float | None = None  # first to last driver.log line
    notes: list[str] = field(default_factory=list)  # what could not be read


def _jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON-object lines of a file and how many other non-empty lines it had (e.g. half-written at a
    crash)."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _log_span(run_dir: Path) -> float | None:
    """Seconds from the first line of the oldest driver.log (rotated: driver.log.N) to the last line of
    driver.log."""
    from datetime import datetime

    rotated = sorted((p for p in run_dir.glob("driver.log.*") if p.suffix[1:].isdigit()),
                     key=lambda p: -int(p.suffix[1:]))
    files = [p for p in [*rotated, run_dir / "driver.log"] if p.is_file()]
    if not files:
        return None
    with open(files[0], "rb") as f:
        head = _STAMP.findall(f.read(4096))
    with open(files[-1], "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 65536))
        tail = _STAMP.findall(f.read())
    if not head or not tail:
        return None
    t0, t1 = (datetime.strptime(s.decode(), "%Y-%m-%d %H:%M:%S").timestamp() + int(ms) / 1000
              for s, ms in (head[0], tail[-1]))
    return t1 - t0


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not path.exists():
        raise RunDirError(f"run directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{str(path)!r} is not a directory (give the run directory of "
                          "`clsrl train --run-dir`)")
    if not any((path / name).exists() for name in ("metrics.jsonl", "config.yaml", "eval")):
        raise RunDirError(f"{str(path)!r} is not a run directory: it has no metrics.jsonl, config.yaml or "
                          "eval/")
    run = Run(path)
    if (path / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
            run.config = cfg if isinstance(cfg, dict) else None
        except yaml.YAMLError as err:
            run.notes.append(f"config.yaml is not valid YAML ({str(err).splitlines()[0]})")
    if (path / "metrics.jsonl").is_file():
        rows, bad = _jsonl(path / "metrics.jsonl")
        run.rows = [r for r in rows if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)]
        if bad or len(run.rows) < len(rows):
            run.notes.append(f"metrics.jsonl: skipped {bad + len(rows) - len(run.rows)} lines that are not "
                             "step rows (half-written at a crash?)")
    last = max((r["step"] for r in run.rows), default=None)
    # every attempt (a --resume included) rewrites config.yaml when it starts
    started = (path / "config.yaml").stat().st_mtime if (path / "config.yaml").is_file() else None
    for f in sorted(path.glob("eval/step-*.jsonl")):
        if m := _EVAL_FILE.match(f.name):
            step = int(m.group(1))
            if last is not None and started is not None and step > last and f.stat().st_mtime < started:
                run.notes.append(f"eval/{f.name}: left by an attempt before a --resume (past the last logged "
                                 f"step {last}, older than config.yaml): not shown")
                continue
            rows, bad = _jsonl(f)
            answers = [r for r in rows if finite(r.get("correct"))]
            if bad or len(answers) < len(rows):
                run.notes.append(f"eval/{f.name}: skipped {bad + len(rows) - len(answers)} lines without a "
                                 "score")
            if answers:
                run.evals[step] = answers
    if (path / "staleness.json").is_file():
        try:
            counts = json.loads((path / "staleness.json").read_text())
            run.staleness = {int(k): int(v) for k, v in counts.items()}
        except (ValueError, TypeError, AttributeError):
            run.notes.append("staleness.json is not a {lag: count} object")
    run.log_span_s = _log_span(path)
    return run


def config_get(cfg: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def config_datasets(cfg: dict | None) -> list[dict]:
    """The config's data sets as {name, weight, data, task}, named the way the run names them."""
    if not cfg:
        return []
    entries = cfg.get("datasets") or [{"weight": 1.0, "data": cfg.get("data"), "task": cfg.get("task")}]
    out = []
    for e in entries if isinstance(entries, list) else []:
        e = e if isinstance(e, dict) else {}
        data, task = (x if isinstance(x, dict) else {} for x in (e.get("data"), e.get("task")))
        name = data.get("name") or (Path(str(data["root"])).name if data.get("root")
                                    else data.get("bundled") or "shapes")
        weight = e.get("weight", 1.0)
        out.append({"name": str(name), "weight": float(weight) if finite(weight) else 1.0, "data": data,
                    "task": task})
    return out


def dataset_names(run: Run) -> list[str]:
    """The data sets the run's files mention (config order first); the config's when the files mention
    none."""
    found = {k.split("/")[1] for r in run.rows for k in r if k.count("/") == 2 and (
        k.startswith(("eval/", "data/")) or k.startswith("reward/") and k.endswith("/mean"))}
    found |= {a["dataset"] for answers in run.evals.values() for a in answers
              if isinstance(a.get("dataset"), str)}
    configured = [d["name"] for d in config_datasets(run.config)]
    if not found:
        return configured
    return [n for n in configured if n in found] + sorted(found - set(configured))


def dataset_of(answer: dict, default: str) -> str:
    return answer["dataset"] if isinstance(answer.get("dataset"), str) else default


def group_by(items: list[dict], key: Callable[[dict], str]) -> dict[str, list[dict]]:
    """The items by key, keys in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def eval_scores(answers: list[dict], default: str) -> dict[str, tuple[float, int]]:
    """{data set: (sum of scores, answers)} of one eval."""
    groups = group_by(answers, lambda a: dataset_of(a, default))
    return {ds: (sum((a["correct"] for a in group), 0.0), len(group)) for ds, group in groups.items()}


def accuracy_by_step(run: Run, names: list[str]) -> dict[int, dict[str, float]]:
    """step -> {data set: accuracy, "overall": unweighted mean}; from metrics.jsonl, plus the eval files of
    steps whose metrics row was never written (a crash between the eval and the row)."""
    table: dict[int, dict[str, float]] = {}
    for r in run.rows:
        if finite(r.get("eval/accuracy")):
            entry = {"overall": r["eval/accuracy"]}
            entry.update({n: r[f"eval/{n}/accuracy"] for n in names
                          if finite(r.get(f"eval/{n}/accuracy"))})
            if len(names) == 1:
                entry[names[0]] = r["eval/accuracy"]
            table[r["step"]] = entry
    for step, answers in run.evals.items():
        if step not in table:
            scores = eval_scores(answers, names[0] if names else "data")
            entry = {ds: s / n for ds, (s, n) in scores.items()}
            table[step] = {**entry, "overall": statistics.fmean(entry.values())}
    return dict(sorted(table.items()))
