"""telemetry.logs: the driver's rotating run log."""
from __future__ import annotations

import logging
import re

import pytest

from telemetry.logs import LOG_FILE, close_run_logging, run_log_path, setup_run_logging

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) \S+ \[\d+\]: ")


@pytest.fixture(autouse=True)
def detach():
    yield
    close_run_logging()


def ours(kind: str | None = None) -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if getattr(h, "_clsrl_run_log", None) is not None and kind in (None, h._clsrl_run_log)]


def test_writes_clsrl_info_and_everyones_warnings_with_timestamps(tmp_path):
    log = setup_run_logging(tmp_path)
    assert log.name == "clsrl" and run_log_path() == (tmp_path / LOG_FILE).resolve()
    log.info("step %d done", 3)
    logging.getLogger("clsrl.job").info("child logger")
    logging.getLogger("clsrl.job").debug("too verbose")
    logging.getLogger("stream.buffer").warning("Redis retry 1/5")
    logging.getLogger("stream.buffer").info("library chatter")
    logging.getLogger().error("root error")
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert len(lines) == 4 and all(STAMP.match(line) for line in lines), lines
    assert [line.split(": ", 1)[1] for line in lines] == ["step 3 done", "child logger", "Redis retry 1/5", "root error"]
    assert " clsrl.job " in lines[1] and " WARNING stream.buffer " in lines[2]


def test_idempotent_and_a_new_run_dir_replaces_the_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    setup_run_logging(a)
    setup_run_logging(a)
    assert len(ours("file")) == 1
    logging.getLogger("clsrl").info("one")
    assert (a / LOG_FILE).read_text().count("one") == 1  # not written twice
    old = ours("file")[0]
    setup_run_logging(b)
    assert len(ours("file")) == 1 and ours("file")[0] is not old and old.stream is None  # the old file is closed
    logging.getLogger("clsrl").info("two")
    assert "two" not in (a / LOG_FILE).read_text() and "two" in (b / LOG_FILE).read_text()
    close_run_logging()
    assert ours() == [] and run_log_path() is None


def test_rotation_keeps_backups_files(tmp_path):
    log = setup_run_logging(tmp_path, max_bytes=300, backups=2)
    for i in range(60):
        log.info("message %03d %s", i, "x" * 40)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [LOG_FILE, LOG_FILE + ".1", LOG_FILE + ".2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 300
    newest = (tmp_path / LOG_FILE).read_text().splitlines()
    assert newest[-1].endswith(f"message 059 {'x' * 40}")
    kept = [int(m) for name in files for m in re.findall(r"message (\d{3})", (tmp_path / name).read_text())]
    assert sorted(kept) == list(range(60 - len(kept), 60))  # the newest ones, contiguous; the oldest rotated out
    assert 0 not in kept


def test_console_keeps_warnings_when_nothing_else_handles_root(tmp_path, capsys):
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # as in a plain `clsrl train`: no handler on root (pytest's own ones removed here)
    try:
        setup_run_logging(tmp_path)
        setup_run_logging(tmp_path)
        assert len(ours("console")) == 1
        logging.getLogger("stream.buffer").warning("visible")
        logging.getLogger("clsrl").info("file only")
        err = capsys.readouterr().err
        assert "visible" in err and "file only" not in err
        setup_run_logging(tmp_path, console=False)
        assert ours("console") == []
    finally:
        close_run_logging()
        root.handlers = saved


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        setup_run_logging(tmp_path, max_bytes=0)
