"""Put one `make bench` run's tables into BENCHMARKS.md, so every number there comes from the same run.

    python bench/writeup.py runs/bench BENCHMARKS.md

`make bench` saves each benchmark's output as RUN_DIR/NAME.log and its wall time as RUN_DIR/NAME.time. Each
block of BENCHMARKS.md between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is replaced by the markdown
tables NAME printed (its lines starting with "|"), in order; `<!-- bench:run -->` gets the machine, the date
and each benchmark's wall time. A block whose benchmark left no log is an error naming it (nothing is
written).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ alone is on the path
from telemetry.tables import md_table  # noqa: E402

BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def tables(log: str) -> str:
    """The markdown tables in a benchmark's output, separated by blank lines."""
    out, previous = [], False
    for line in log.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous and out:
            out.append("")
        if is_row:
            out.append(line.rstrip())
        previous = is_row
    return "\n".join(out) + "\n" if out else ""


def run_summary(run_dir: Path) -> str:
    times = {p.stem: float(p.read_text().split()[0]) for p in sorted(run_dir.glob("*.time"))
             if p.read_text().strip()}
    rows = [[f"`{name}`", f"{seconds / 60:.1f}"] for name, seconds in times.items()]
    newest = max(p.stat().st_mtime for p in run_dir.glob("*.log"))
    when = datetime.datetime.fromtimestamp(newest).strftime("%Y-%m-%d")
    return (f"Run of {when} on {platform.machine()} Linux, {os.cpu_count()} cores, "
            f"{platform.python_version()}; wall time {sum(times.values()) / 60:.1f} min in all:\n\n"
            + md_table(["benchmark", "minutes"], rows, "lr") + "\n")


def fill(text: str, run_dir: Path) -> str:
    missing = [m["name"] for m in BLOCK.finditer(text)
               if m["name"] != "run" and not (run_dir / f"{m['name']}.log").is_file()]
    if missing:
        raise SystemExit(f"no output in {run_dir} for: {', '.join(missing)} (run `make bench` first)")

    def body(m: re.Match) -> str:
        name = m["name"]
        new = run_summary(run_dir) if name == "run" else tables((run_dir / f"{name}.log").read_text())
        if not new:
            raise SystemExit(f"{run_dir / (name + '.log')} holds no table")
        return f"{m.group(1)}{new}{m.group(4)}"

    return BLOCK.sub(body, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("doc", type=Path)
    args = parser.parse_args(argv)
    args.doc.write_text(fill(args.doc.read_text(), args.run_dir))
    print(f"{args.doc}: tables from {args.run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
