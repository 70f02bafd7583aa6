"""MetricsLogger: jsonl round trip, NaN handling, resume truncation, TensorBoard mirror, and the curves PNG."""
from __future__ import annotations

import json
import logging
import math

import pytest

from telemetry.metrics import MetricsLogger, read_metrics
from telemetry.plots import plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _realistic_rows(n: int = 12) -> list[dict]:
    rows = []
    for step in range(n):
        row = {
            "step": step,
            "reward/mean": 0.2 + 0.05 * step,
            "reward/cls_equality": 0.1 + 0.06 * step,
            "pg_loss": 0.5 / (step + 1),
            "kl": 0.001 * step,
            "clip_frac": 0.02,
            "length/mean": 40.0 - step,
            "length/max": 64,
            "logprob_gap": 0.01,
            "time/generate": 3.0,
            "time/train": 2.0,
            "time/sync": 0.4,
            "sync/mb_per_s": 900.0 + step,
        }
        if step % 5 == 0:
            row["eval/accuracy"] = 0.3 + 0.04 * step
        rows.append(row)
    return rows


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def test_rows_written_and_read_back(tmp_path):
    rows = [{"step": 0, "reward/mean": 0.25, "note": "a"}, {"step": 1, "reward/mean": 0.5, "length/max": 7}]
    with MetricsLogger(tmp_path / "run", loggers=()) as m:
        for r in rows:
            m.log(r)
        assert m.rows == rows
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == rows
    _assert_png(tmp_path / "run" / "curves.png")


def test_nan_and_inf_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, loggers=()) as m:
        m.log({"step": 3, "kl": float("nan"), "pg_loss": float("inf"), "loss": 1.5})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line) == {"step": 3, "kl": None, "pg_loss": None, "loss": 1.5}
    assert "NaN" not in line and "Infinity" not in line


def test_step_must_be_int(tmp_path):
    with MetricsLogger(tmp_path, loggers=()) as m:
        for bad in ({"kl": 1.0}, {"step": 1.0}, {"step": True}):
            with pytest.raises(ValueError):
                m.log(bad)
        assert m.rows == []


def test_resume_truncates_and_drops_corrupt_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": s, "kl": s / 10} for s in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 6, "kl": 0.')  # crash mid-line
    with caplog.at_level(logging.WARNING, logger="telemetry.metrics"):
        m = MetricsLogger(tmp_path, loggers=(), resume_step=3)
    assert any("metrics.jsonl:7" in r.getMessage() for r in caplog.records), caplog.text
    assert m.rows == good[:4]
    assert read_metrics(path) == good[:4]  # rewritten on disk, not just filtered in memory
    m.log({"step": 4, "kl": 9.0})
    m.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    assert read_metrics(path)[-1]["kl"] == 9.0
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_append_after_crash_keeps_next_row_intact(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "kl": 1}\n{"step": 1, "k')
    with MetricsLogger(tmp_path, loggers=()) as m:
        m.log({"step": 2, "kl": 3})
    with caplog.at_level(logging.WARNING, logger="telemetry.metrics"):
        assert read_metrics(path) == [{"step": 0, "kl": 1}, {"step": 2, "kl": 3}]
    assert "metrics.jsonl:2" in caplog.text


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as m:
        m.log({"step": 5, "reward/mean": 0.75, "length/max": 12, "flag": True, "name": "x", "kl": float("nan")})
        m.log({"step": 6, "reward/mean": 0.5})
    tb_dir = tmp_path / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward/mean", "length/max"} <= tags
    assert not tags & {"step", "flag", "name", "kl"}
    events = acc.Scalars("reward/mean")
    assert [(e.step, e.value) for e in events] == [(5, 0.75), (6, 0.5)]
    assert acc.Scalars("length/max")[0].value == 12


def test_plot_curves_realistic(tmp_path):
    out = plot_curves(_realistic_rows(), tmp_path / "sub" / "curves.png", title="run")
    assert out == tmp_path / "sub" / "curves.png"
    _assert_png(out)


def test_plot_curves_sparse_and_missing(tmp_path):
    rows = _realistic_rows(3)
    rows[1]["kl"] = None  # nan written as null: a gap, not a crash
    del rows[2]["pg_loss"]
    _assert_png(plot_curves(rows, tmp_path / "a.png"))
    _assert_png(plot_curves([{"step": 0, "kl": 0.1}], tmp_path / "one.png"))


def test_plot_curves_no_known_keys(tmp_path):
    _assert_png(plot_curves([{"step": 0, "something/else": 1.0}], tmp_path / "empty.png"))
    _assert_png(plot_curves([], tmp_path / "none.png"))


def test_more_panels_make_a_bigger_figure(tmp_path):
    from PIL import Image

    small = Image.open(plot_curves([{"step": 0, "kl": 0.1}], tmp_path / "s.png")).size
    big = Image.open(plot_curves(_realistic_rows(), tmp_path / "b.png")).size
    assert big[0] > small[0] and big[1] > small[1]


def test_close_is_idempotent(tmp_path):
    m = MetricsLogger(tmp_path)
    m.log({"step": 0, "reward/mean": 1.0})
    m.close()
    png = tmp_path / "curves.png"
    mtime = png.stat().st_mtime_ns
    m.close()
    assert png.stat().st_mtime_ns == mtime
    with pytest.raises(RuntimeError):
        m.log({"step": 1})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "reward/mean": 1.0}]


def test_tensor_scalars_are_logged_as_numbers(tmp_path):
    import torch

    with MetricsLogger(tmp_path, loggers=()) as m:
        m.log({"step": 0, "kl": torch.tensor(0.25), "loss": torch.tensor(float("nan"))})
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert row["kl"] == 0.25 and row["loss"] is None
    assert not math.isnan(m.rows[0]["kl"])
