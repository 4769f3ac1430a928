"""Training entry point shared by `mmgpt train` and `accelerate launch -m train`."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training YAML (see configs/train/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 max_steps=200")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train an mmgpt model.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args) -> int:
    from train.config import ConfigError, load_config
    from train.data.bad import DataError
    from train.loop import Interrupted, TrainingError, run_training

    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_training(cfg)
    except (ConfigError, DataError, TrainingError) as err:
        print(f"mmgpt train: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"mmgpt train: stopped by {stop}", file=sys.stderr)
        return 128 + stop.signum
    from accelerate import PartialState

    if PartialState().is_main_process:  # one summary line per run, not one per process
        print(json.dumps({k: v for k, v in summary.items() if k != "bad_records"}, default=str))
    return 0
