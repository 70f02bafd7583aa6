"""The driver's log file: runs/NAME/driver.log, rotated by size.

`setup_run_logging(run_dir)` puts one RotatingFileHandler on the root logger. It writes what the "clsrl" logger
tree logs at `level` (INFO by default) and above, plus WARNING and above from any logger (the rollout buffer's
retries, Ray, libraries), each line timestamped. It is idempotent: a second call for the same run dir changes
nothing, a call for another run dir closes the old file and opens the new one, so there is never more than one.

Once the root logger has a handler, Python's last-resort stderr output of warnings stops; so unless something
else already handles the root logger (a user's basicConfig, pytest), a stderr handler for WARNING and above is
added alongside, keeping warnings on the console as before. Only the driver process calls this: Ray workers
log to Ray's own files.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = "clsrl"
LOG_FILE = "driver.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"  # asctime: 2025-01-31 12:00:00,123
_MARK = "_clsrl_run_log"  # attribute on the handlers we own: "file" or "console"
_ANNOUNCED = "clsrl_announced"  # record attribute: already printed by announce(), the console handler skips it


class _RunLogFilter(logging.Filter):
    """Records of the clsrl tree at `level` and up, and anyone's WARNING and up."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        ours = record.name == LOGGER or record.name.startswith(LOGGER + ".")
        return ours and record.levelno >= self.level


def _owned(kind: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, _MARK, None) == kind]


def _remove(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def setup_run_logging(run_dir: str | os.PathLike, max_bytes: int = 10 * 2**20, backups: int = 3,
                      level: int = logging.INFO, console: bool = True) -> logging.Logger:
    """Log to run_dir/driver.log (rotated at max_bytes into driver.log.1 .. driver.log.{backups}); returns the
    "clsrl" logger, whose level is set to `level` so its INFO records are produced at all."""
    if max_bytes < 1 or backups < 0:
        raise ValueError(f"setup_run_logging: max_bytes must be >= 1 and backups >= 0, got {max_bytes}, {backups}")
    path = (Path(run_dir) / LOG_FILE).resolve()
    root, logger = logging.getLogger(), logging.getLogger(LOGGER)
    logger.setLevel(level)
    current = _owned("file")
    if len(current) == 1 and Path(current[0].baseFilename) == path and current[0].maxBytes == max_bytes \
            and current[0].backupCount == backups:
        current[0].filters[0].level = level
    else:
        for h in current:
            _remove(h)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_RunLogFilter(level))
        setattr(handler, _MARK, "file")
        root.addHandler(handler)
    others = [h for h in root.handlers if getattr(h, _MARK, None) is None]
    if console and not others and not _owned("console"):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(logging.WARNING)
        stderr.addFilter(lambda record: not getattr(record, _ANNOUNCED, False))
        stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        setattr(stderr, _MARK, "console")
        root.addHandler(stderr)
    elif not console:
        for h in _owned("console"):
            _remove(h)
    return logger


def close_run_logging() -> None:
    """Detach and close what setup_run_logging attached (at the end of a run, and in tests)."""
    for kind in ("file", "console"):
        for h in _owned(kind):
            _remove(h)


def run_log_path() -> Path | None:
    """The file the driver log goes to now, or None."""
    current = _owned("file")
    return Path(current[0].baseFilename) if current else None


def announce(message: str, logger: str = LOGGER, level: int = logging.INFO) -> None:
    """A line for the user: printed to stdout, and kept in driver.log at `level` (not echoed to stderr again)."""
    print(message, flush=True)
    logging.getLogger(logger).log(level, message, extra={_ANNOUNCED: True}, stacklevel=2)


@contextmanager
def run_logging(run_dir: str | os.PathLike, **kwargs) -> Iterator[logging.Logger]:
    """setup_run_logging for the length of a `with` block, closed on the way out (errors included)."""
    logger = setup_run_logging(run_dir, **kwargs)
    try:
        yield logger
    finally:
        close_run_logging()
