"""The quiet console of `clsrl train`: libraries' log records, Python warnings, native stderr and Ray actors'
output go to the run's files; the console keeps the bars, announce() lines, clsrl's warnings and the result.
--verbose leaves everything as the libraries print it."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from commands.cli import DEFAULT_CONFIG, REPO_ROOT
from telemetry import logs
from telemetry.logs import LOG_FILE, STDERR_FILE, announce, quiet_console, ray_log_to_driver


@contextmanager
def bare_root():
    """As in a plain `clsrl train`: no handler on the root logger (pytest's own ones put back afterwards)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    try:
        yield
    finally:
        logs.close_run_logging()
        root.handlers = saved


@contextmanager
def library(name: str, stream):
    """A library logger the way Ray, Transformers and torch set theirs up: its own stream handler, no
    propagation."""
    lib = logging.getLogger(name)
    handler = logging.StreamHandler(stream)
    lib.addHandler(handler)
    lib.propagate = False
    try:
        yield lib
    finally:
        lib.removeHandler(handler)
        lib.propagate = True


@pytest.mark.parametrize("imported_before", [False, True], ids=["fresh", "deepspeed-imported-before"])
def test_quiet_console_sends_library_output_to_files_and_keeps_ours(tmp_path, capfd, imported_before):
    showwarning, late = warnings.showwarning, logging.getLogger("DeepSpeed")
    saved = late.handlers[:], late.propagate
    late.handlers.clear()
    if imported_before:  # DeepSpeed's logger set up by an import before the run (adopted at the start)
        late.addHandler(logging.StreamHandler(sys.stdout))
        late.propagate = False
    with bare_root(), library("somelib", sys.stderr) as lib:
        with quiet_console(tmp_path):
            assert ray_log_to_driver() is False
            late.addHandler(logging.StreamHandler(sys.stdout))  # (set up again) after the console went quiet
            late.propagate = False
            lib.warning("somelib noise")
            late.warning("Setting accelerator to CPU")
            warnings.warn("a deprecated thing", FutureWarning, stacklevel=1)
            logging.getLogger("stream.buffer").warning("Redis retry 1/5")  # clsrl's own: on the console
            os.write(2, b"core_worker.cc: native noise\n")
            print("GRPO: 50%|#####", file=sys.stderr)  # what a progress bar writes
            announce("ray: local")
        given_back = len(lib.handlers), lib.propagate
    assert len(late.handlers) == 1 + imported_before and late.propagate is False
    late.handlers[:], late.propagate = saved
    out, err = capfd.readouterr()
    assert out == "ray: local\n"
    assert "Redis retry 1/5" in err and "GRPO: 50%" in err
    for noise in ("somelib noise", "Setting accelerator", "deprecated thing", "native noise"):
        assert noise not in out + err
    driver_log = (tmp_path / LOG_FILE).read_text()
    for line in ("WARNING somelib", "WARNING DeepSpeed", "FutureWarning: a deprecated thing", "Redis retry",
                 "INFO clsrl [", "ray: local"):
        assert line in driver_log, driver_log
    assert (tmp_path / STDERR_FILE).read_text() == "core_worker.cc: native noise\n"
    # all given back: the library's handler, Python's warnings, fd 2
    assert given_back == (1, False) and warnings.showwarning is showwarning
    assert ray_log_to_driver() is True and logs._Quiet.adopted == {}
    os.write(2, b"back on the terminal\n")
    assert capfd.readouterr().err == "back on the terminal\n"


def test_verbose_changes_nothing(tmp_path, capfd):
    with bare_root(), library("somelib", sys.stderr) as lib, quiet_console(tmp_path, verbose=True):
        assert ray_log_to_driver() is True
        lib.warning("somelib noise")
        os.write(2, b"native\n")
    assert capfd.readouterr().err == "somelib noise\nnative\n"
    assert not (tmp_path / STDERR_FILE).exists()


def test_transformers_warnings_and_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled(), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    with bare_root(), quiet_console(tmp_path):
        assert not hf_logging.is_progress_bar_enabled() and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        hf_logging.get_logger("transformers.models.x").warning("requires torchvision (not installed)")
    assert (hf_logging.is_progress_bar_enabled(), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")) == before
    assert "torchvision" not in capfd.readouterr().err
    assert "WARNING transformers.models.x" in (tmp_path / LOG_FILE).read_text()


def test_packages_are_pyprojects():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert sorted(logs.PACKAGES) == sorted(pyproject["tool"]["setuptools"]["packages"])


# ---- a real `clsrl train` ----

FAST = ["train.steps=2", "train.warm_start_steps=1", "train.prompts_per_step=4", "train.eval_every=0",
        "data.eval_limit=4", "sampling.n=4", "learner.micro_batch_size=8", "train.loggers=[]",
        "algorithm.dynamic_sampling=false",  # 1 warm-start step: groups all wrong, dynamic sampling would redraw
        "cluster.rollout_workers=1", "cluster.learner_ranks=1"]  # one actor of each kind shows every logger
# what Ray, DeepSpeed, Transformers and the actors print on a CPU run when nobody stops them
NOISE = ["Setting accelerator to CPU", "Started a local Ray instance", "Token authentication", "core_worker.cc",
         "pid=", "Loading weights", "[transformers]", "Warning", "WARNING"]


BAR = re.compile(r"^[^|]+: +\d+%\|")  # tqdm: "GRPO:  50%|#####     | 1/2 [...]"


def clsrl_train(run_dir: Path, *overrides: str, verbose: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "commands.cli", "train", str(DEFAULT_CONFIG), *FAST, *overrides,
                           "--run-dir", str(run_dir), *["--verbose"] * verbose], cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_clsrl_train_console_quiet_and_verbose(tmp_path):
    out = clsrl_train(tmp_path / "quiet")
    lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    for want in ("data: ", "ray: local", "logs: driver.log, stderr.log, ray-logs/", "| policy | held-out",
                 "run directory: "):
        assert any(line.startswith(want) for line in lines), out
    assert [n for n in NOISE if n in out] == [], out
    run = tmp_path / "quiet"
    driver_log = (run / LOG_FILE).read_text()
    announced = {line.split("]: ", 1)[1] for line in driver_log.splitlines() if " INFO clsrl [" in line}
    other = [line for line in lines if not BAR.match(line) and not line.startswith(("|", "run directory: "))
             and line not in announced]
    assert other == [], other  # nothing but the bars, the announcements and the result
    assert "Setting accelerator to CPU" in driver_log and "Started a local Ray instance" in driver_log
    errs = "".join(p.read_text(errors="replace") for p in (run / "ray-logs").glob("worker-*.err"))
    assert ":actor_name:LearnerActor" in errs and ":actor_name:RolloutWorker" in errs

    # the noise comes from starting Ray and the actors: one step, no warm start, no eval is enough
    out = clsrl_train(tmp_path / "verbose", "train.steps=1", "train.warm_start_steps=0", "data.eval_limit=1",
                      verbose=True)
    for noise in ("Setting accelerator to CPU", "Started a local Ray instance", "pid="):
        assert noise in out, out[-5000:]
    assert not (tmp_path / "verbose" / STDERR_FILE).exists()
