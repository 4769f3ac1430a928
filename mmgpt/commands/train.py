"""`mmgpt train CONFIG.yaml [key.sub=value ...]` (the training stack is imported only when run)."""


def add_arguments(parser) -> None:
    parser.add_argument("config", help="training YAML (see configs/train/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 max_steps=200")


def run(args) -> int:
    from train.main import run as run_train

    return run_train(args)
