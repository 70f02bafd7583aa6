"""The `clsrl` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads from a CLI run unless the user says so
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_CONFIG = REPO_ROOT / "configs" / "cpu_demo.yaml"


def _cmd_demo(args: argparse.Namespace) -> int:
    from cluster.config import DemoConfig
    from cluster.demo import run_demo
    from cluster.schema import load_config

    cfg = load_config(DemoConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir or REPO_ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S"))
    t0 = time.time()
    result = run_demo(cfg, run_dir)
    print(f"\n| model | held-out accuracy |\n|---|---|\n| zero-shot (random init) | {result['zero_shot']:.3f} |"
          f"\n| GRPO start (after format warm start) | {result['grpo_start']:.3f} |"
          f"\n| after {cfg.train.steps} GRPO steps | {result['final']:.3f} |")
    print(f"\nrun directory: {run_dir} ({time.time() - t0:.0f} s); metrics in {run_dir / 'metrics.jsonl'}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from tasks.bundled import ensure_bundled

    print(ensure_bundled(args.name, args.root))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clsrl", description="GRPO fine-tuning of vision-language models "
                                     "with rule-based rewards.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="in-process GRPO on the embedded default (tiny model, bundled data)")
    demo.add_argument("config", nargs="?", default=str(DEFAULT_DEMO_CONFIG))
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    demo.add_argument("--run-dir", default=None)
    demo.set_defaults(func=_cmd_demo)
    data = sub.add_parser("data", help="write a bundled data set (shapes, digits) and print its folder")
    data.add_argument("name")
    data.add_argument("--root", default=None)
    data.set_defaults(func=_cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = str(DEFAULT_DEMO_CONFIG)
    from cluster.schema import ConfigError
    from tasks.manifest import DatasetError

    try:
        return args.func(args)
    except (ConfigError, DatasetError) as err:
        print(f"clsrl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
