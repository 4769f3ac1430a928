"""`mmgpt demo --out DIR`: shapes -> train the tiny preset -> evaluate -> report."""


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--test-images", type=int, default=300, help="held-out test images to score")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/train/shapes-tiny.yaml")


def run(args) -> int:
    from train.demo import run_demo

    run_demo(args.out, args.overrides, test_images=args.test_images)
    return 0
