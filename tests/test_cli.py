"""The command line: dotted overrides anywhere among the options, parsed without starting a run; what a user\ncaused is one error line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

import commands.cli as cli
from protocol.config import ExperimentConfig
from protocol.overrides import ConfigError, load_config
from tasks.data import load_run_data

CFG = str(cli.DEFAULT_CONFIG)


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ["train", CFG, "--run-dir", "X", "train.steps=3", "train.eval_every=2"],
    ["train", CFG, "train.steps=3", "train.eval_every=2", "--run-dir", "X"],
    ["train", CFG, "train.steps=3", "--run-dir", "X", "train.eval_every=2"],
    ["train", "--run-dir", "X", CFG, "train.steps=3", "train.eval_every=2"],
])
def test_train_overrides_before_or_after_options(argv):
    args = parse(*argv)
    assert (args.config, args.overrides, args.run_dir) == (CFG, ["train.steps=3", "train.eval_every=2"], "X")
    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    assert (cfg.train.steps, cfg.train.eval_every) == (3, 2)


def test_eval_and_transfer_overrides_anywhere():
    args = parse("eval", CFG, "--model", "M", "data.k_shot=4", "--out", "O", "rollout.eval_max_new_tokens=8")
    assert (args.model, args.out, args.overrides) == ("M", "O", ["data.k_shot=4", "rollout.eval_max_new_tokens=8"])
    args = parse("transfer", CFG, "--checkpoint", "a=runs/a", "train.steps=2", "--out", "O", "train.eval_every=2")
    assert args.checkpoint == ["a=runs/a"] and args.overrides == ["train.steps=2", "train.eval_every=2"]


@pytest.fixture
def dispatched(monkeypatch):
    """main(argv) -> the args the train command would have run with (no run is started)."""
    seen = []
    monkeypatch.setattr(cli, "_cmd_train", lambda args: seen.append(args) or 0)

    def run(*argv: str):
        assert cli.main(list(argv)) == 0
        return seen.pop()

    return run


def test_main_takes_overrides_after_options_and_without_a_config(dispatched):
    args = dispatched("train", "train.steps=3", "--run-dir", "X", "train.eval_every=2")
    assert (args.config, args.overrides, args.run_dir) == (CFG, ["train.steps=3", "train.eval_every=2"], "X")
    args = dispatched("demo", "--run-dir", "X", "train.steps=3")
    assert (args.config, args.overrides) == (CFG, ["train.steps=3"])


def test_resume_followed_by_an_override_is_not_its_tag(dispatched):
    args = dispatched("train", CFG, "--run-dir", "X", "--resume", "train.steps=3")
    assert (args.resume, args.overrides) == (True, ["train.steps=3"])
    args = dispatched("train", CFG, "--run-dir", "X", "--resume", "step-000050", "train.steps=3")
    assert (args.resume, args.overrides) == ("step-000050", ["train.steps=3"])


def test_a_bad_override_after_an_option_is_reported_naming_the_key(capsys):
    assert cli.main(["train", CFG, "--run-dir", "X", "train.stpes=3"]) == 2  # fails on the config, before any run
    assert "did you mean 'train.steps'?" in capsys.readouterr().err


def test_an_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit):
        parse("train", CFG, "--run-dri", "X")
    assert "unrecognized arguments: --run-dri" in capsys.readouterr().err


# ---- user errors: one `clsrl: error:` line, the traceback in the run's driver.log ----

def test_a_corrupt_image_is_one_error_line_naming_the_file_and_the_data_set(tmp_path, tiny_model_dir):
    root = tmp_path / "pets"
    for split in ("train", "test"):
        for i, (name, colour) in enumerate((("cat", (200, 10, 10)), ("dog", (10, 10, 200)))):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 30), colour).save(root / split / name / f"{i}.png")
    bad = root / "train" / "dog" / "b.jpg"
    bad.write_bytes(b"\xff\xd8 not really a JPEG")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(cli.REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "commands.cli", "train", f"data.root={root}",
                           f"model.path={tiny_model_dir}", "--run-dir", str(run)],
                          cwd=cli.REPO_ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("clsrl: error: data set 'pets': cannot read image "), errors
    assert str(bad) in errors[0] and "data.skip_bad_images=true skips" in errors[0]
    log = (run / "driver.log").read_text()
    assert "ERROR clsrl" in log and "Traceback" in log and "tasks.images.ImageLoadError: data set 'pets'" in log


def test_a_misspelt_reward_fails_at_data_loading_naming_the_key():
    cfg = load_config(ExperimentConfig, CFG, ["task.rewards=[{name: cls_equalty}]"])
    with pytest.raises(ConfigError, match=r"config key 'task.rewards': unknown reward 'cls_equalty' "
                                          r"\(did you mean 'cls_equality'\?\)"):
        load_run_data(cfg)


def test_the_result_table_says_when_the_start_eval_was_skipped():
    from commands.cli import result_table

    shown = result_table({"grpo_start": 0.25, "final": 0.5, "steps": 3}, "grpo", True)
    assert "| GRPO start (step 0, after the format warm start) | 0.250 |" in shown
    assert "| after 3 GRPO steps | 0.500 |" in shown
    skipped = result_table({"grpo_start": None, "final": 0.5, "steps": 3}, "sft", False)
    assert "| SFT start (step 0) | not run (train.eval_at_start=false) |" in skipped


def test_the_driver_starts_without_transformers_model_and_processor_code():
    """`clsrl train` reads its data and starts Ray before anything needs a model: importing the driver must
    not load transformers' processing and modeling stack (2.4 s of a run's start, and ~120 MB of the driver)."""
    code = ("import sys, commands.cli, cluster.driver; "
            "print([m for m in ('transformers.processing_utils', 'transformers.modeling_utils') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=cli.REPO_ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]", out
