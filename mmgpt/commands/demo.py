"""`mmgpt demo --out DIR`: shapes -> train the tiny preset -> evaluate -> report."""


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--test-images", type=int, default=300, help="held-out test images to score")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/train/shapes-tiny.yaml")


def run(args) -> int:
    import sys

    from mmgpt.cli import UserError
    from train.config import ConfigError
    from train.data.bad import DataError
    from train.demo import run_demo
    from train.loop import Interrupted, TrainingError

    try:
        run_demo(args.out, args.overrides, test_images=args.test_images)
    except (ConfigError, DataError, TrainingError) as err:
        raise UserError(str(err)) from None
    except Interrupted as stop:
        print(f"mmgpt demo: stopped by {stop}", file=sys.stderr)
        return 128 + stop.signum
    return 0
