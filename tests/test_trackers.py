"""train.loggers: the wandb and MLflow trackers behind MetricsLogger, offline, read back the way a user would
(the wandb run file that `wandb sync` uploads; MLflow's own client), and the errors for a missing package."""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import yaml

from protocol.config import ExperimentConfig, TrainConfig
from protocol.overrides import ConfigError, load_config
from telemetry import metrics
from telemetry.metrics import LOGGERS, MetricsLogger, check_loggers, read_metrics

ROWS = [{"step": 0, "eval/accuracy": 0.25}, {"step": 1, "reward/mean": 0.5, "kl": float("nan"), "note": "x"},
        {"step": 2, "reward/mean": 0.75, "length/max": 12, "eval/accuracy": 0.5}]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run = tmp_path / "demo-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 2, "loggers": ["wandb"]}}))
    return run


def test_choices_match_the_config():
    assert tuple(TrainConfig().loggers) == ("tensorboard",)
    cfg = load_config(ExperimentConfig, None, ["train.loggers=[tensorboard, wandb, mlflow]"])
    assert tuple(cfg.train.loggers) == LOGGERS == tuple(metrics.TRACKERS)
    assert load_config(ExperimentConfig, None, ["train.loggers=[]"]).train.loggers == []


def test_unknown_or_missing_tracker_is_a_config_error_naming_the_key_and_the_install(monkeypatch):
    with pytest.raises(ConfigError, match="train.loggers: unknown logger 'tb'"):
        check_loggers(["tb"])
    with pytest.raises(ConfigError, match="must be a list"):
        check_loggers("wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        MetricsLogger("unused", ["tensorboard", "wandb"])
    assert "train.loggers has 'wandb'" in str(err.value) and "pip install 'clsrl[tracking]'" in str(err.value)
    assert check_loggers(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_mlflow_needs_sqlalchemy_only_for_its_local_store(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alembic" else real(name, *a))
    with pytest.raises(ConfigError, match="alembic is not installed"):
        check_loggers(["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert check_loggers(["mlflow"]) == ["mlflow"]


def wandb_records(run_file):
    """The records of a .wandb file (W&B's LevelDB-style log of protobuf Records: a 7-byte header, then 32 KiB
    blocks of chunks, each a 4-byte checksum, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, out = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is too short for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_wandb_offline_run_holds_every_step_and_the_config(run_dir, capsys):
    with MetricsLogger(run_dir, ["wandb"]) as m:
        for row in ROWS:
            m.log(row)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    assert f"wandb: offline run in {runs[0]} (upload: wandb sync {runs[0]})" in capsys.readouterr().out
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history[r.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                           for i in r.history.item if not (i.key or i.nested_key[0]).startswith("_")}
    assert history == {0: {"eval/accuracy": 0.25}, 1: {"reward/mean": 0.5},
                       2: {"reward/mean": 0.75, "length/max": 12, "eval/accuracy": 0.5}}
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project, run.run_group) == ("demo-run", "clsrl", "demo-run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train"] == {"steps": 2, "loggers": ["wandb"]}, config


def test_mlflow_local_store_read_back_through_mlflow(run_dir, capsys):
    from mlflow.tracking import MlflowClient

    with MetricsLogger(run_dir, ["mlflow"]) as m:
        for row in ROWS:
            m.log(row)
    with MetricsLogger(run_dir, ["mlflow"], resume_step=1) as m:  # a resumed run: a second MLflow run
        m.log({"step": 2, "reward/mean": 0.625})
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    assert f"in {uri} (experiment 'clsrl')" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("clsrl")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"demo-run", "demo-run-from-step-1"}
    first = runs["demo-run"]
    assert first.info.status == "FINISHED" and first.data.params == {"train.steps": "2", "train.loggers": "['wandb']"}
    assert first.data.tags["clsrl.run_dir"] == str(run_dir.resolve())
    history = lambda run, key: [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, key)]
    assert history(first, "reward/mean") == [(1, 0.5), (2, 0.75)]
    assert history(first, "eval/accuracy") == [(0, 0.25), (2, 0.5)]
    assert history(first, "kl") == [] and "note" not in first.data.metrics
    assert history(runs["demo-run-from-step-1"], "reward/mean") == [(2, 0.625)]
    assert exp.artifact_location == (run_dir / "mlartifacts").resolve().as_uri()


class Flaky:
    def __init__(self, run_dir, resume_step):
        self.closed = False

    def log(self, row, step):
        if step == 1:
            raise ConnectionError("tracking server went away")

    def close(self):
        self.closed = True


def test_a_failing_tracker_is_dropped_and_the_jsonl_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(metrics.TRACKERS, "tensorboard", Flaky)
    with caplog.at_level(logging.WARNING, logger="telemetry.metrics"), MetricsLogger(tmp_path) as m:
        for row in ROWS:
            m.log(row)
        assert m._trackers == {}
    assert "tensorboard failed at step 1 (ConnectionError: tracking server went away)" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
