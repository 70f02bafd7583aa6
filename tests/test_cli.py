"""The command line: dotted overrides anywhere among the options, parsed without starting a run."""
from __future__ import annotations

import pytest

import commands.cli as cli
from protocol.config import ExperimentConfig
from protocol.overrides import load_config

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
