"""The run's metrics: one JSON object per step appended to run_dir/metrics.jsonl, the source of truth. The
curves.png (telemetry/plots.py) and the trackers named by `train.loggers` are views of it:

  tensorboard  run_dir/tensorboard/ (TensorBoard event files)
  wandb        Weights & Biases: mode $WANDB_MODE, else online when $WANDB_API_KEY is set, else offline,
               the run kept under run_dir/wandb/ for `wandb sync`; project $WANDB_PROJECT (default clsrl)
  mlflow       MLflow: $MLFLOW_TRACKING_URI, else sqlite:///run_dir/mlflow.db (read it with `mlflow ui
               --backend-store-uri sqlite:///...`); experiment $MLFLOW_EXPERIMENT_NAME (default clsrl)

wandb and mlflow are the optional `tracking` extra: pip install 'clsrl[tracking]'. Each tracker is a small
class with log(row, step) and close(); one that fails mid-run is dropped with a warning (the jsonl has all).
A resumed run opens a new wandb / MLflow run named NAME-from-step-N (wandb: in the group NAME), since both
reject or double the steps redone after the checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from protocol.overrides import ConfigError
from telemetry.logs import adopt_library_logs, announce
from telemetry.plots import finite, is_number, plot_curves

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
LOGGERS = ("tensorboard", "wandb", "mlflow")  # the choices of train.loggers
TRACKING_EXTRA = "pip install 'clsrl[tracking]'"


def _jsonable(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null. 0-d tensors / numpy scalars become Python numbers."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """Parse a metrics.jsonl; bad lines (e.g. half-written at a crash) are skipped, with a warning."""
    path, rows = Path(path), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("%s:%d: dropping line that is not valid JSON (%s)", path, lineno, e)
                continue
            if not isinstance(row, dict):
                log.warning("%s:%d: dropping line that is not a JSON object", path, lineno)
                continue
            rows.append(row)
    return rows


def _atomic_write_lines(path: Path, rows: list[dict]) -> None:
    # tmp + os.replace: a crash mid-rewrite leaves either the old or the new file, never a truncated one
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


# ---- trackers ----

def _needs(name: str) -> tuple[str, ...]:
    """The modules a tracker imports: MLflow's own sqlite store also needs SQLAlchemy and Alembic."""
    if name == "mlflow":
        return ("mlflow",) if os.environ.get("MLFLOW_TRACKING_URI") else ("mlflow", "sqlalchemy", "alembic")
    return (name,)


def check_loggers(names: Sequence[str]) -> list[str]:
    """`names` without repeats; a ConfigError for an unknown name or a tracker whose package is missing."""
    if isinstance(names, str):
        raise ConfigError(f"train.loggers must be a list, e.g. [{names}], got {names!r}")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"train.loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        missing = [m for m in _needs(name) if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"train.loggers has {name!r} but {', '.join(missing)} is not installed: "
                              f"{TRACKING_EXTRA} (or drop {name!r} from train.loggers)")
    return list(dict.fromkeys(names))


class Tracker(Protocol):
    def log(self, row: dict[str, float], step: int) -> None: ...  # row: the step's finite numbers
    def close(self) -> None: ...


def _run_name(run_dir: Path, resume_step: int | None) -> str:
    return run_dir.name if resume_step is None else f"{run_dir.name}-from-step-{resume_step}"


def _run_config(run_dir: Path) -> dict:
    """The run's config.yaml (written by the job before metrics start), for the trackers' run parameters."""
    import yaml

    path = run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    return data if isinstance(data, dict) else {}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard hide the old run's events past the checkpoint, as the jsonl drops them
        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        import wandb

        adopt_library_logs()  # quiet console: wandb's logger to the run log
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # console="off": wandb leaves stdout/stderr alone (no wrapping of the progress bar and the run log)
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "clsrl"),
                               name=_run_name(run_dir, resume_step), group=run_dir.name, dir=str(run_dir),
                               mode=mode, config=_run_config(run_dir), reinit="create_new",
                               settings=wandb.Settings(console="off", silent=True))
        url, local = getattr(self._run, "url", None) if mode == "online" else None, Path(self._run.dir).parent
        announce(f"wandb: {url}" if url else f"wandb: {mode} run in {local} (upload: wandb sync {local})")

    def log(self, row: dict[str, float], step: int) -> None:
        self._run.log(row, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        adopt_library_logs()  # quiet console: MLflow's (database set-up, ...) to the run log
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self._client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "clsrl")
        exp = client.get_experiment_by_name(name)
        local = uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI")
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None)
        run = client.create_run(exp_id, run_name=_run_name(run_dir, resume_step),
                                tags={"clsrl.run_dir": str(run_dir.resolve())})
        self._id = run.info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flatten(_run_config(run_dir)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self._id, params=params[i:i + 100])
        announce(f"mlflow: run {self._id} in {uri} (experiment {name!r})")

    def log(self, row: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._id, metrics=[Metric(k, float(v), now, step) for k, v in row.items()])

    def close(self) -> None:
        self._client.set_terminated(self._id)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                             "mlflow": MlflowTracker}


# ---- the logger ----

class MetricsLogger:
    """Appends one row per step to run_dir/metrics.jsonl and mirrors its finite numbers to the `loggers`."""

    def __init__(self, run_dir: str | Path, loggers: Sequence[str] = ("tensorboard",),
                 resume_step: int | None = None, filename: str = METRICS_FILE,
                 keep_rows: bool = True) -> None:
        """keep_rows=False: a write-only log (no curves.png, rows not kept in memory), e.g. the trained-ids
        audit. resume_step: rows after it are dropped from the file (the steps will be redone)."""
        names = check_loggers(loggers)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        self._keep = keep_rows
        self._rows: list[dict] = read_metrics(self.path) if self.path.exists() else []
        if resume_step is not None:
            # steps after the checkpoint will be redone: drop them so they are not shown twice
            self._rows = [r for r in self._rows if is_number(r.get("step")) and r["step"] <= resume_step]
            _atomic_write_lines(self.path, self._rows)
        if not keep_rows:
            self._rows = []
        self._file = open(self.path, "a", encoding="utf-8")
        if _ends_mid_line(self.path):
            self._file.write("\n")  # a crash mid-line: keep the next row off the broken one
        self._closed = False
        self._trackers: dict[str, Tracker] = {}
        try:
            for name in names:
                self._trackers[name] = TRACKERS[name](self.run_dir, resume_step)
        except BaseException:
            self.close()
            raise

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def log(self, row: dict) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger is closed")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"metrics row needs an int 'step', got {step!r}")
        clean = _jsonable(row)
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()  # a crash loses at most the row being written
        if self._keep:
            self._rows.append(clean)
        # non-finite values are null in the jsonl (missing), so the trackers skip them too
        numbers = {k: v for k, v in clean.items() if k != "step" and finite(v)}
        for name, tracker in list(self._trackers.items()):
            try:
                tracker.log(numbers, step)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not end the run
                log.warning("train.loggers: %s failed at step %d (%s: %s); it is off for the rest of the "
                            "run, metrics.jsonl has every row", name, step, type(err).__name__, err)
                self._close_tracker(name)

    def _close_tracker(self, name: str) -> None:
        tracker = self._trackers.pop(name)
        try:
            tracker.close()
        except Exception as err:  # noqa: BLE001
            log.warning("train.loggers: closing %s failed (%s: %s)", name, type(err).__name__, err)

    def plot(self) -> Path:
        return plot_curves(self._rows, self.run_dir / PLOT_FILE, title=self.run_dir.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in list(self._trackers):
            self._close_tracker(name)
        self._file.close()
        if self._keep:
            self.plot()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
