"""`mmgpt data shapes OUT_DIR --n N [--split test]`: write the shapes world as an imagefolder."""

import argparse


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True
    p = sub.add_parser(
        "shapes",
        help="the built-in shapes world, as images + metadata.jsonl",
        description="Write images 00000.png ... and metadata.jsonl into OUT_DIR. Writing into a folder "
        "written before replaces that data set: metadata.jsonl is rewritten and the images the earlier "
        "metadata.jsonl listed that the new one does not (e.g. 00042.png of a larger run) are removed; "
        "other files are left alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    p.add_argument("--n", type=int, default=1000, help="number of images (at least 1)")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (at least 32)")


def run(args) -> int:
    from mmgpt.cli import UserError
    from train.data import write_shapes_imagefolder
    from train.data.shapes import MIN_IMAGE_SIZE

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    try:
        path = write_shapes_imagefolder(args.out_dir, args.n, split=args.split, image_size=args.image_size)
    except OSError as err:
        where = err.filename or args.out_dir
        raise UserError(f"{where}: cannot write there ({err.strerror or err}); use another OUT_DIR") from None
    print(f"wrote {args.n} {args.split} images and their captions/questions to {path}")
    return 0
