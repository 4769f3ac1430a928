"""The `mmgpt` command line. Each subcommand lives in its own module and is imported only when run,
so `mmgpt caption` never loads the training stack."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "caption": ("mmgpt.commands.use", "caption images"),
    "ask": ("mmgpt.commands.use", "answer a question about an image"),
    "chat": ("mmgpt.commands.chat", "talk with a model about images in the terminal"),
    "retrieve": ("mmgpt.commands.use", "rank texts for images and images for texts"),
    "eval": ("mmgpt.commands.evaluate", "evaluate a model on a data source"),
    "train": ("mmgpt.commands.train", "train from a YAML config"),
    "demo": ("mmgpt.commands.demo", "generate shapes, train the tiny model, evaluate, write samples"),
    "data": ("mmgpt.commands.data", "write data sets (the built-in shapes world) to disk"),
    "serve": ("mmgpt.commands.serve", "serve a model over HTTP with a web page"),
    "explain": ("mmgpt.commands.explain", "draw where the decoder looked for each generated word"),
    "export": ("mmgpt.commands.export", "export a model folder to ONNX (onnxruntime, transformers.js)"),
    "index": ("mmgpt.commands.search", "build or update a search index of an image folder"),
    "search": ("mmgpt.commands.search", "search an index by text or by image"),
    "classify": ("mmgpt.commands.search", "zero-shot classification of images against labels"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgpt", description="Vision-language models: caption, ask, retrieve, train.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        _add_arguments(name, module, p)
    return parser


def _add_arguments(name: str, module: str, parser: argparse.ArgumentParser) -> None:
    mod = importlib.import_module(module)
    adder = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
    adder(parser)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


def load_model(model: str, device=None, **kwargs):
    """`mmgpt.load` for a command: a folder that cannot be used, or an unknown or unavailable --device, is a
    UserError (one line naming the folder and what is wrong, exit status 2)."""
    from mmgpt.api import ModelLoadError, load

    try:
        return load(model, device=device, **kwargs)
    except ModelLoadError as err:
        raise UserError(str(err)) from None
    except (AssertionError, RuntimeError, ValueError) as err:
        raise UserError(f"{model}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args.command}", None) or mod.run
    try:
        return int(runner(args) or 0)
    except UserError as err:
        print(f"mmgpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmgpt caption ... | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush of stdout at exit would fail again
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
