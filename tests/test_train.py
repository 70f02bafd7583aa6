"""The distributed loop for real: local Ray, private Redis, DeepSpeed over gloo, HF engines, gloo weight broadcast."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import ray

from cluster.driver import train
from cluster.job import Job
from commands.cli import DEFAULT_CONFIG, main
from protocol.config import ExperimentConfig
from protocol.overrides import load_config

SMALL = ["train.steps=3", "train.warm_start_steps=2", "train.prompts_per_step=4", "train.eval_every=2",
         "train.save_every=1", "data.eval_limit=8", "sampling.n=4", "learner.micro_batch_size=4",
         "weight_sync.timeout_s=15", "algorithm.dynamic_sampling=false"]  # 2 warm-start steps: no signal to keep


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cfg(*extra):
    return load_config(ExperimentConfig, DEFAULT_CONFIG, SMALL + list(extra))


@pytest.mark.slow
def test_three_steps_then_resume_gives_the_same_next_step(ray_local, tmp_path):
    cfg = _cfg("algorithm.beta=0.04")  # the reference model and the KL term on the learner ranks too
    result = train(cfg, tmp_path)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert result["grpo_start"] == rows[0]["eval/accuracy"] and result["final"] == rows[-1]["eval/accuracy"]
    step = rows[1]
    for key in ("reward/mean", "reward/cls_equality", "length/mean", "pg_loss", "kl", "clip_frac", "grad_norm",
                "time/generate", "time/train_step", "time/step", "time/sync", "sync/mb_per_s", "buffer/depth"):
        assert key in step, key
    assert all(r["logprob_gap"] < 1e-4 for r in rows[1:])  # engines and learners score the same tokens the same way
    assert all(r["staleness/max"] == 0 for r in rows[1:])  # on-policy: every group came from the latest weights
    assert rows[-1]["buffer/depth"] == 0 and rows[-1]["buffer/pending"] == 0  # everything acked
    assert (tmp_path / "checkpoints" / "step-000003" / "hf" / "config.json").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "tensorboard").is_dir()
    assert len((tmp_path / "eval" / "step-000002.jsonl").read_text().splitlines()) == 8

    train(cfg, tmp_path, resume="step-000002")  # step 3 again, from the step-2 checkpoint
    again = _rows(tmp_path)
    assert [r["step"] for r in again] == [0, 1, 2, 3]  # the resumed run replaced step 3, kept 0-2
    first, second = rows[3], again[3]
    assert second["reward/mean"] == first["reward/mean"]  # same prompts, same weights, same samples
    assert second["pg_loss"] == pytest.approx(first["pg_loss"], rel=1e-5, abs=1e-7)
    assert second["kl"] == pytest.approx(first["kl"], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_asynchronous_run_respects_the_staleness_bound(ray_local, tmp_path):
    """Rollout runs ahead by up to 2 versions: some trained groups were sampled with older weights (a
    synchronous run trains only on version-0-behind groups), nothing older than 2 is trained on, and every
    draw is trained on once."""
    cfg = _cfg("rollout.max_staleness=2", "rollout.prompts_per_call=2", "train.steps=4", "train.save_every=0",
               "cluster.learner_ranks=1")  # two engines to run ahead, one rank to train
    result = train(cfg, tmp_path)
    rows = _rows(tmp_path)[1:]
    assert max(r["staleness/max"] for r in rows) <= 2
    assert set(result["staleness"]) <= {0, 1, 2} and sum(result["staleness"].values()) == 4 * 4
    ahead = {lag: n for lag, n in result["staleness"].items() if lag >= 1}
    assert ahead and max(r["staleness/max"] for r in rows) >= 1, result["staleness"]  # rollout ran ahead
    assert all(r["dropped/duplicate"] == 0 for r in rows)
    assert json.loads((tmp_path / "staleness.json").read_text()) == {str(k): v for k, v in result["staleness"].items()}
    assert (tmp_path / "staleness.png").stat().st_size > 1000
    _check_report_of_a_real_run(tmp_path, _rows(tmp_path))


def _check_report_of_a_real_run(run_dir, rows):
    """`clsrl report` on what a real run left: every section drawn from real keys (a renamed metric shows
    as a skipped section), the accuracy table from the run's own eval rows."""
    from commands.report import build_report

    md = build_report(run_dir).read_text()
    skipped = [line for line in md.splitlines() if "Skipped" in line]
    assert skipped == ["_Skipped: no KL values in metrics.jsonl (algorithm.beta = 0: no reference model, no KL "
                       "term)._"], skipped
    assert "## Notes" not in md, md
    evals = [r for r in rows if "eval/accuracy" in r]
    first, last = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
    assert f"| {first:.3f} | {last:.3f} | {last - first:+.3f} |" in md, md
    drawn = [line for line in md.splitlines() if line.startswith("![")]
    assert len(drawn) >= 6, drawn  # reward, accuracy, length, clip, learner, timings, staleness (no KL here)
    for line in drawn:
        assert (run_dir / "report" / line.split("](")[1].rstrip(")")).stat().st_size > 1000, line


@pytest.mark.slow
def test_engines_match_learners_and_a_killed_engine_is_named(ray_local, tmp_path):
    cfg = _cfg("train.warm_start_steps=0", "weight_sync.timeout_s=8", "weight_sync.heartbeat_s=0.5",
               "cluster.learner_ranks=1")  # two engines (one to kill), one rank to compare them with
    with Job(cfg, tmp_path) as job:
        def same_weights() -> bool:
            learner = ray.get(job.learners[0].checksums.remote())
            return all(ray.get(w.checksums.remote()) == learner for w in job.rollout_workers)

        assert same_weights()  # after the initial broadcast
        ledger = job.ledger()
        job.scheduler(ledger).fill(0)
        learned = job.finish_train(job.start_train(0, 0))
        ledger.settle([d for r in learned for d in r.draws])
        job.broadcast(1)
        assert same_weights()  # bit for bit after a trained step
        victim = ray.get(job.rollout_workers[1].info.remote())
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            job.broadcast(2, attempts=1)
        assert time.monotonic() - t0 < 30
        assert victim["name"] in str(err.value), str(err.value)[-2000:]


@pytest.mark.slow
def test_default_config_shows_grpo_learning(ray_local, tmp_path):
    """The README's main job: accuracy at GRPO start is chance (4 classes) and clearly higher after 100 steps."""
    result = train(load_config(ExperimentConfig, DEFAULT_CONFIG), tmp_path)
    assert result["grpo_start"] <= 0.4
    assert result["final"] >= result["grpo_start"] + 0.3, result


def test_cli_rejects_a_typo(capsys):
    assert main(["train", "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
