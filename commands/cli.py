"""The `clsrl` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads from a CLI run unless the user says so
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "cpu_demo.yaml"


def _cmd_train(args: argparse.Namespace) -> int:
    from cluster.driver import train
    from protocol.config import ExperimentConfig
    from protocol.overrides import load_config
    from telemetry.logs import quiet_console
    from telemetry.metrics import check_loggers

    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    check_loggers(cfg.train.loggers)  # a missing tracker package fails here, not after the job has started
    if args.resume and not args.run_dir:
        raise SystemExit("clsrl: error: --resume needs --run-dir (the run to continue)")
    run_dir = Path(args.run_dir or Path("runs") / time.strftime(f"{Path(args.config).stem}-%Y%m%d-%H%M%S"))
    args.log_dir = run_dir  # where main() puts the traceback of a user error
    with quiet_console(run_dir, verbose=args.verbose):  # libraries' and Ray actors' output to files
        result = train(cfg, run_dir, resume=args.resume)
    print("\n" + result_table(result, cfg.train.mode, bool(cfg.train.warm_start_steps)))
    print(f"\nrun directory: {run_dir} ({result['seconds']:.0f} s): metrics.jsonl, curves.png, tensorboard/, "
          "checkpoints/")
    return 0


def result_table(result: dict, mode: str, warm_started: bool) -> str:
    """The run's held-out accuracy before and after training, as the console shows it."""
    from telemetry.tables import md_table

    mode = mode.upper()
    warm = ", after the format warm start" if warm_started else ""
    start = result["grpo_start"]
    start = "not run (train.eval_at_start=false)" if start is None else f"{start:.3f}"
    rows = [[f"{mode} start (step 0{warm})", start],
            [f"after {result['steps']} {mode} steps", f"{result['final']:.3f}"]]
    return md_table(["policy", "held-out accuracy"], rows)


def _cmd_eval(args: argparse.Namespace) -> int:
    from commands.evaluation import resolve_model, run_eval
    from protocol.config import ExperimentConfig
    from protocol.overrides import load_config

    overrides = list(args.overrides) + ([f"model.path={resolve_model(args.model)}"] if args.model else [])
    cfg = load_config(ExperimentConfig, args.config, overrides)
    out = Path(args.out or Path("runs") / time.strftime(f"eval-{Path(args.config).stem}-%Y%m%d-%H%M%S"))
    result = run_eval(cfg, out, args.protocol, args.base_to_new, args.max_new_tokens)
    print("\n" + (out / "eval.md").read_text())
    print(f"results: {out / 'eval.json'} (every answer kept), {result['seconds']:.0f} s")
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    from commands.transfer import run_transfer
    from protocol.config import ExperimentConfig
    from protocol.overrides import ConfigError, load_config

    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    bad = [c for c in args.checkpoint if "=" not in c]
    if bad:
        raise ConfigError(f"--checkpoint takes NAME=PATH, got {bad[0]!r}")
    out = Path(args.out or Path("runs") / time.strftime(f"transfer-{Path(args.config).stem}-%Y%m%d-%H%M%S"))
    run_transfer(cfg, out, dict(c.split("=", 1) for c in args.checkpoint), args.protocol)
    print("\n" + (out / "transfer.md").read_text())
    print(f"heatmap: {out / 'transfer.png'}, numbers: {out / 'transfer.csv'}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from tasks.bundled import ensure_bundled

    print(ensure_bundled(args.name, args.root))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from commands.report import build_report  # lazily: matplotlib and yaml only for this command

    print(build_report(args.run_dir, args.out))
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser taking its positionals (config, overrides) anywhere among its options:
    `clsrl train CFG --run-dir X key=value` as well as `clsrl train CFG key=value --run-dir X`."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._mixing:  # parse_known_intermixed_args makes its two passes through this method
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clsrl", description="GRPO fine-tuning of vision-language models "
                                     "with rule-based rewards, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    for name, helptext in (("train", "run an experiment: rollout workers, reward actors, DeepSpeed learners, "
                                     "Redis"),
                           ("demo", "`train` on the embedded default (tiny model, bundled data, local Ray)")):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                         help=f"YAML config (default {DEFAULT_CONFIG.name})")
        cmd.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 data.root=DIR")
        cmd.add_argument("--run-dir", default=None, help="where metrics, checkpoints and Redis data go")
        cmd.add_argument("--resume", nargs="?", const=True, default=None, metavar="TAG",
                         help="continue the run in --run-dir from its newest checkpoint "
                              "(or TAG, e.g. step-000050)")
        cmd.add_argument("--verbose", action="store_true", help="everything on the console: Ray actors' "
                         "output, library warnings and progress bars (default: in RUN_DIR's log files)")
        cmd.set_defaults(func=_cmd_train)
    ev = sub.add_parser("eval", help="greedy accuracy on the test split of the config's data sets, "
                                     "over Ray engines")
    ev.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                    help="YAML config naming the model and data sets")
    ev.add_argument("overrides", nargs="*",
                    help="dotted overrides, e.g. data.root=DIR rollout.eval_max_new_tokens=1024")
    ev.add_argument("--model", default=None,
                    help="a model folder, a checkpoint (step-N) or a run dir (its newest one)")
    ev.add_argument("--protocol", choices=["cls_rl", "visual_rft"], default=None,
                    help="score every data set with this paper's protocol "
                         "(default: each task's correct_reward)")
    ev.add_argument("--base-to-new", action="store_true",
                    help="evaluate base and new classes apart; report H")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.eval_max_new_tokens")
    ev.add_argument("--out", default=None,
                    help="folder for eval.json and eval.md (default runs/eval-CONFIG-TIME)")
    ev.set_defaults(func=_cmd_eval)
    tr = sub.add_parser("transfer", help="train on each data set, test on all: the free-lunch heatmap")
    tr.add_argument("config", help="YAML config with a `datasets` list (at least 2)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, applied to every run")
    tr.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                    help="use a finished run/checkpoint for data set NAME instead of training it "
                         "(repeatable)")
    tr.add_argument("--protocol", choices=["cls_rl", "visual_rft"], default=None, help="as for `clsrl eval`")
    tr.add_argument("--out", default=None, help="output folder (default runs/transfer-CONFIG-TIME)")
    tr.set_defaults(func=_cmd_transfer)
    data = sub.add_parser("data", help="write a bundled data set (shapes, digits) and print its folder")
    data.add_argument("name")
    data.add_argument("--root", default=None)
    data.set_defaults(func=_cmd_data)
    report = sub.add_parser("report", help="write RUN_DIR/report/report.md: curves (PNG) and eval tables "
                                           "of a run")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--out", default=None, metavar="DIR",
                        help="where report.md and its PNGs go (default RUN_DIR/report)")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "demo", "eval") and args.config and "=" in args.config:  # no config given
        args.overrides.insert(0, args.config)
        args.config = str(DEFAULT_CONFIG)
    if isinstance(getattr(args, "resume", None), str) and "=" in args.resume:  # `--resume key=value`: no TAG
        args.overrides.append(args.resume)
        args.resume = True
    try:
        return args.func(args)
    except _user_errors() as err:
        _log_traceback(getattr(args, "log_dir", None), err)
        print(f"clsrl: error: {err}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user causes and fixes (the config, the data on disk, the resources asked for): the message says
    what and where, so main prints it, not a traceback."""
    from cluster.placement import PlacementError
    from protocol.overrides import ConfigError
    from rewards.registry import RewardParamError, UnknownRewardError
    from tasks.images import ImageLoadError
    from tasks.manifest import DatasetError

    return (ConfigError, DatasetError, ImageLoadError, UnknownRewardError, RewardParamError, PlacementError,
            FileNotFoundError)


def _log_traceback(run_dir: Path | None, err: Exception) -> None:
    """The full traceback of a user error, appended to the run's driver.log when the run got that far."""
    from telemetry.logs import FORMAT, LOG_FILE

    path = Path(run_dir) / LOG_FILE if run_dir else None
    if path is None or not path.is_file():
        return
    record = logging.LogRecord("clsrl", logging.ERROR, __file__, 0, "clsrl: error: %s", (err,),
                               (type(err), err, err.__traceback__))
    with open(path, "a", encoding="utf-8") as f:
        f.write(logging.Formatter(FORMAT).format(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
