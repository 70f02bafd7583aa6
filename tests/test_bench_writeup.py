"""bench/writeup.py: BENCHMARKS.md's tables come from one `make bench` run's logs, block by block."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from writeup import fill, tables  # noqa: E402

DOC = """# Benchmarks
<!-- bench:run -->
old run line
<!-- /bench:run -->
Prose stays.
<!-- bench:limits_buffer -->
| old | table |
<!-- /bench:limits_buffer -->
More prose.
"""


def test_tables_keeps_only_table_lines_and_separates_tables():
    log = "[12:00:00] progress\n| a | b |\n|---|---|\n| 1 | 2 |\nwrote x.json\n| c |\n|---|\n"
    assert tables(log) == "| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\n"


def test_fill_replaces_each_block_with_its_benchmarks_tables_and_the_run_summary(tmp_path):
    (tmp_path / "limits_buffer.log").write_text("[t] start\n| op | ratio |\n|---|---:|\n| put | 0.90 |\n")
    (tmp_path / "limits_buffer.time").write_text("95.0\n")
    out = fill(DOC, tmp_path)
    assert "| old | table |" not in out and "old run line" not in out
    assert ("<!-- bench:limits_buffer -->\n| op | ratio |\n|---|---:|\n| put | 0.90 |\n"
            "<!-- /bench:limits_buffer -->") in out
    assert "| `limits_buffer` | 1.6 |" in out and "wall time 1.6 min in all" in out
    assert out.count("Prose stays.") == 1 and out.endswith("More prose.\n")


def test_a_block_without_a_log_names_the_benchmark_and_writes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="no output in .* for: limits_buffer"):
        fill(DOC, tmp_path)
