"""`mmgpt data shapes OUT_DIR --n N [--split test]`: write the shapes world as an imagefolder."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True
    p = sub.add_parser("shapes", help="the built-in shapes world, as images + metadata.jsonl")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--image-size", type=int, default=64)


def run(args) -> int:
    from train.data import write_shapes_imagefolder

    path = write_shapes_imagefolder(args.out_dir, args.n, split=args.split, image_size=args.image_size)
    print(f"wrote {args.n} {args.split} images and their captions/questions to {path or args.out_dir}")
    return 0
