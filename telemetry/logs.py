"""The driver's log file and the console.

`setup_run_logging(run_dir)` puts one RotatingFileHandler on the root logger: runs/NAME/driver.log. It
writes what the "clsrl" logger tree logs at `level` (INFO by default) and above, WARNING and above from any
logger (the rollout buffer's retries, Ray, libraries), and whatever a library adopted by the quiet console
logs, each line timestamped. It is idempotent: a second call for the same run dir changes nothing, a call for
another run dir closes the old file and opens the new one, so there is never more than one. Once the root
logger has a handler, Python's last-resort stderr output of warnings stops; so unless something else already
handles the root logger (a user's basicConfig, pytest), a stderr handler for WARNING and above is added.

`quiet_console(run_dir)` is what `clsrl train` runs in (`--verbose` skips it). The console then shows the
progress bars, what clsrl decided (`announce`), clsrl's own warnings and the result; the rest goes to files:

  driver.log   the libraries' log records (Ray, Transformers, DeepSpeed, torch, ...) and Python warnings
  stderr.log   what is written to the driver's stderr below Python (Ray's C++ core worker, child processes)
  ray-logs/    a link to Ray's session log folder: each actor's stdout/stderr (worker-*.out, worker-*.err),
               which Ray keeps there instead of forwarding it to the driver (ray.init's log_to_driver=False)
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = "clsrl"
LOG_FILE = "driver.log"
STDERR_FILE = "stderr.log"
RAY_LOGS = "ray-logs"
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"  # asctime: 2025-01-31 12:00:00,123
# this project's top-level packages (pyproject's [tool.setuptools] packages): their loggers are clsrl's own
PACKAGES = ("actors", "cluster", "commands", "learner", "protocol", "rewards", "stream", "tasks", "telemetry",
            "vlm", "weights")
# one-logger libraries imported after the quiet console starts (DeepSpeed: by the warm start): their first
# record takes their console handler off (a logger's filters run before its handlers)
LATE_LOGGERS = ("DeepSpeed",)
_MARK = "_clsrl_run_log"  # attribute on the handlers we own: "file" or "console"
_ANNOUNCED = "clsrl_announced"  # record attribute: printed by announce(), the console handler skips it


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in (LOGGER, *PACKAGES)


class _Quiet:
    """The quiet console's state: what it took from whom, to give it back."""

    active = False
    adopted: dict[str, tuple[list[logging.Handler], bool]] = {}  # logger -> (its console handlers, propagate)


def _adopted(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in _Quiet.adopted)


class _RunLogFilter(logging.Filter):
    """Records of the clsrl tree at `level` and up, anyone's WARNING and up, all of an adopted library's."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or _adopted(record.name):
            return True
        return record.name.split(".", 1)[0] == LOGGER and record.levelno >= self.level


def _console_filter(record: logging.LogRecord) -> bool:
    """The console's stderr handler: not what announce() printed already; when quiet, only clsrl's own."""
    return not getattr(record, _ANNOUNCED, False) and (not _Quiet.active or _ours(record.name))


def _owned(kind: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, _MARK, None) == kind]


def _remove(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def setup_run_logging(run_dir: str | os.PathLike, max_bytes: int = 10 * 2**20, backups: int = 3,
                      level: int = logging.INFO, console: bool = True) -> logging.Logger:
    """Log to run_dir/driver.log (rotated at max_bytes into driver.log.1 .. driver.log.{backups}); returns
    the "clsrl" logger, whose level is set to `level` so its INFO records are produced at all."""
    if max_bytes < 1 or backups < 0:
        raise ValueError(f"setup_run_logging: max_bytes must be >= 1 and backups >= 0, got {max_bytes}, "
                         f"{backups}")
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
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_RunLogFilter(level))
        setattr(handler, _MARK, "file")
        root.addHandler(handler)
    others = [h for h in root.handlers if getattr(h, _MARK, None) is None]
    if console and not others and not _owned("console"):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(logging.WARNING)
        stderr.addFilter(_console_filter)
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
    """A line for the user: printed to stdout, and kept in driver.log at `level` (not echoed to stderr)."""
    tqdm = sys.modules.get("tqdm")  # progress bars on the terminal are cleared first, redrawn below the line
    bars = tqdm is not None and getattr(tqdm.tqdm, "_instances", None)
    with tqdm.tqdm.external_write_mode(file=sys.stdout) if bars else contextlib.nullcontext():
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


# ---- the quiet console ----

def _console_handler(h: logging.Handler) -> bool:
    """A handler that prints to the terminal: a StreamHandler (any stream: the std ones as they were when
    the library set it up, pytest's captures), not a file, not ours."""
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
        and getattr(h, _MARK, None) is None


def _adopt(logger: logging.Logger) -> None:
    """Take the logger's console handlers off and let its records reach the root logger (the run log)."""
    if _ours(logger.name):
        return
    handlers = [h for h in logger.handlers if _console_handler(h)]
    if handlers or not logger.propagate:
        for h in handlers:
            logger.removeHandler(h)
        # adopted before and set up again since (a library re-importing its logger): keep what it had first
        taken, propagate = _Quiet.adopted.get(logger.name, ([], logger.propagate))
        _Quiet.adopted[logger.name] = (taken + handlers, propagate)
        logger.propagate = True


def _adopt_late(record: logging.LogRecord) -> bool:
    if _Quiet.active:
        _adopt(logging.getLogger(record.name))
    return True


def adopt_library_logs() -> None:
    """Quiet console: every library logger that prints to the terminal now logs to the run log instead. Also
    for a caller that has just imported a library that sets up a handler of its own (no-op when verbose)."""
    if not _Quiet.active:
        return
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and any(_console_handler(h) for h in logger.handlers):
            _adopt(logger)


class _Terminal:
    """fd 2 sent to run_dir/stderr.log; sys.stderr kept on the terminal (the progress bars, tracebacks)."""

    stream = None
    saved_fd: int | None = None
    saved_stderr = None

    @classmethod
    def redirect(cls, path: Path) -> None:
        sys.stderr.flush()
        cls.saved_fd, cls.saved_stderr = os.dup(2), sys.stderr
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        cls.stream = sys.stderr = os.fdopen(os.dup(cls.saved_fd), "w", buffering=1,
                                            encoding=getattr(cls.saved_stderr, "encoding", None) or "utf-8",
                                            errors="backslashreplace")

    @classmethod
    def restore(cls) -> None:
        if cls.saved_fd is None:
            return
        cls.stream.flush()
        os.dup2(cls.saved_fd, 2)
        os.close(cls.saved_fd)
        if sys.stderr is cls.stream:
            sys.stderr = cls.saved_stderr
        cls.stream.close()
        cls.stream = cls.saved_fd = cls.saved_stderr = None


@contextmanager
def _no_library_bars() -> Iterator[None]:
    """Transformers' and the Hub's weight-loading / download bars off (clsrl's own bars stay)."""
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
    tf = sys.modules.get("transformers.utils.logging")
    hub = sys.modules.get("huggingface_hub.utils")
    on = tf.is_progress_bar_enabled() if tf else hub is not None and not hub.are_progress_bars_disabled()
    if tf or hub:
        (tf.disable_progress_bar if tf else hub.disable_progress_bars)()
    try:
        yield
    finally:
        if on:
            (tf.enable_progress_bar if tf else hub.enable_progress_bars)()
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env


def ray_log_to_driver() -> bool:
    """ray.init's log_to_driver: Ray forwards the actors' stdout/stderr to this console unless it is quiet."""
    return not _Quiet.active


def note_ray_logs(run_dir: str | os.PathLike) -> None:
    """After ray.init, quiet console: link run_dir/ray-logs to this Ray session's log folder and say where the
    logs are."""
    if not _Quiet.active:
        return
    run_dir, actors = Path(run_dir), f"{RAY_LOGS}/ (Ray actors)"
    try:
        import ray

        logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for it (Ray 2.60)
        link = run_dir / RAY_LOGS
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
    except Exception as err:  # noqa: BLE001 - the note is a convenience, the run goes on
        logging.getLogger(LOGGER).info("no %s link (%s: %s)", RAY_LOGS, type(err).__name__, err)
        actors = "Ray's session logs (Ray actors)"
    announce(f"logs: {LOG_FILE}, {STDERR_FILE}, {actors} in {run_dir}; --verbose prints them here")


@contextmanager
def quiet_console(run_dir: str | os.PathLike, verbose: bool = False) -> Iterator[None]:
    """The console of a `clsrl train` (see the module's docstring); verbose: everything on it, as Ray and the
    libraries print it. Undone on the way out, errors included."""
    if verbose or _Quiet.active:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _Terminal.redirect(run_dir / STDERR_FILE)
    _Quiet.active = True
    try:
        setup_run_logging(run_dir)  # before anything is adopted: its records have a file to go to
        logging.captureWarnings(True)
        adopt_library_logs()
        for name in LATE_LOGGERS:
            logging.getLogger(name).addFilter(_adopt_late)
        with _no_library_bars():
            yield
    finally:
        _Quiet.active = False
        for name in LATE_LOGGERS:
            logging.getLogger(name).removeFilter(_adopt_late)
        for name, (handlers, propagate) in _Quiet.adopted.items():
            logger = logging.getLogger(name)
            logger.propagate = propagate
            for h in handlers:
                logger.addHandler(h)
        _Quiet.adopted.clear()
        logging.captureWarnings(False)
        close_run_logging()
        _Terminal.restore()
