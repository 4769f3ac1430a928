"""`mmgpt caption`, `mmgpt ask`, `mmgpt retrieve`: use a trained model from the command line.

Output goes to stdout, one result per line (`--json`: one JSON object per line); a bad image gets
its own `path: cause` line on stderr, the others are still done, and the exit status is 1. A model
folder that is missing or invalid is one line on stderr and exit status 2. torch and transformers
are imported inside the run functions: building the parser for `mmgpt --help` stays cheap.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

# --- arguments -------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (written by save_pretrained) or hub id")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8: decoder and LM head weights in int8 (per-channel scales), faster decoding on "
                             "the CPU (default: none)")


def _add_generation(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument("--num-beams", type=int, metavar="K",
                        help="beam search width (default: the model's generation_config, else 1)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="longest output (default: the model's generation_config, else 32)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per batch (default: 16)")
    parser.add_argument("--json", action="store_true", help=json_help)


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_generation(parser, 'one JSON object per line: {"image": ..., "caption": ...}')


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s); the question is asked of each")
    parser.add_argument("question", metavar="QUESTION", help="the question, quoted")
    _add_generation(parser, 'one JSON object per line: {"image": ..., "question": ..., "answer": ...}')
    parser.add_argument("--stream", action="store_true", help="print the answer token by token as it is generated")


def add_retrieve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files")
    parser.add_argument("--texts", nargs="+", required=True, metavar="TEXT", help="texts (quote each)")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="matches listed per query (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (default: 64)")
    parser.add_argument("--json", action="store_true", help="one JSON object with both rankings")


# --- shared steps ----------------------------------------------------------------------------------


def quiet(run):
    """Run a command without transformers' progress bars and warnings on stderr, where our own
    per-image error lines go (the API already turns the warnings that matter into errors)."""

    @functools.wraps(run)
    def wrapper(args) -> int:
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            return run(args)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    return wrapper


def _positive(name: str, value: int) -> None:
    from mmgpt.cli import UserError

    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")


def _load_pipeline(args):
    """The pipeline, or a UserError (exit 2) naming the folder and what is wrong with it."""
    from mmgpt.cli import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, quantize=getattr(args, "quantize", None))


def _read_images(paths: list[str]) -> tuple[list[tuple[str, object]], int]:
    """-> ([(path, PIL image)] for the readable ones, number of bad ones); a line on stderr per bad one."""
    from encoders import ImageLoadError, load_image

    good, bad = [], 0
    for path in paths:
        try:
            good.append((path, load_image(path)))
        except ImageLoadError as err:
            print(str(err), file=sys.stderr, flush=True)
            bad += 1
    return good, bad


def _batches(paths: list[str], size: int):
    """Read images `size` at a time: memory stays bounded however many paths are given."""
    for i in range(0, len(paths), size):
        yield _read_images(paths[i : i + size])


def _gen_options(args) -> dict:
    _positive("--batch-size", args.batch_size)
    gen = {}
    for flag, name in (("--num-beams", "num_beams"), ("--max-new-tokens", "max_new_tokens")):
        if getattr(args, name) is not None:  # unset: the model's generation_config, as the Python API
            _positive(flag, getattr(args, name))
            gen[name] = getattr(args, name)
    return gen


def _emit(obj: dict | str) -> None:
    print(json.dumps(obj, ensure_ascii=False) if isinstance(obj, dict) else obj, flush=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- caption ---------------------------------------------------------------------------------------


@quiet
def run_caption(args) -> int:
    gen = _gen_options(args)
    vl = _load_pipeline(args)
    failed = 0
    for good, bad in _batches(args.images, args.batch_size):
        failed += bad
        if not good:
            continue
        captions = vl.caption([im for _, im in good], batch_size=args.batch_size, **gen)
        for (path, _), cap in zip(good, captions):
            _emit({"image": path, "caption": cap} if args.json else f"{path}\t{_one_line(cap)}")
    return 1 if failed else 0


# --- ask -------------------------------------------------------------------------------------------


@quiet
def run_ask(args) -> int:
    from mmgpt.cli import UserError

    gen = _gen_options(args)
    if args.stream and args.json:
        raise UserError("--stream and --json do not go together: --json prints whole answers")
    if args.stream and args.num_beams not in (None, 1):
        raise UserError("--stream needs --num-beams 1 (beam search settles its tokens only at the end)")
    if args.stream:
        gen["num_beams"] = 1  # streaming is greedy, whatever width the model's generation_config keeps
    if not args.question.strip():
        raise UserError("the question is empty")
    vl = _load_pipeline(args)
    try:
        return _answer_all(args, vl, gen)
    except ValueError as err:  # the model refused the question (e.g. longer than its decoder reads)
        raise UserError(str(err)) from None


def _answer_all(args, vl, gen: dict) -> int:
    several = len(args.images) > 1
    failed = 0
    for good, bad in _batches(args.images, args.batch_size):
        failed += bad
        if not good:
            continue
        if args.stream:
            for path, image in good:
                if several:
                    print(f"{path}\t", end="", flush=True)
                for piece in vl.stream_answer(image, args.question, **gen):
                    print(piece.replace("\n", " "), end="", flush=True)
                print(flush=True)
            continue
        answers = vl.ask([im for _, im in good], args.question, batch_size=args.batch_size, **gen)
        for (path, _), answer in zip(good, answers):
            if args.json:
                _emit({"image": path, "question": args.question, "answer": answer})
            else:
                _emit(f"{path}\t{_one_line(answer)}" if several else _one_line(answer))
    return 1 if failed else 0


# --- retrieve --------------------------------------------------------------------------------------


def rank(sim, k: int) -> list[list[tuple[int, float]]]:
    """(N, M) scores -> for each row, the k best (column, score), best first; ties by column order."""
    import torch

    k = min(k, sim.shape[1])
    # A stable descending sort keeps equal scores in input order, so the output is reproducible.
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]  # (N, k)
    return [[(int(j), float(sim[i, j])) for j in row] for i, row in enumerate(order)]


@quiet
def run_retrieve(args) -> int:
    from mmgpt.cli import UserError

    _positive("--top-k", args.top_k)
    _positive("--batch-size", args.batch_size)
    texts = list(args.texts)
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UserError(f"--texts: text {empty[0] + 1} is empty")
    vl = _load_pipeline(args)
    good, failed = [], 0
    for g, bad in _batches(args.images, args.batch_size):
        good += g
        failed += bad
    if not good:
        return 1
    paths = [p for p, _ in good]
    sim = vl.similarity([im for _, im in good], texts)  # (N_img, N_txt) cosine
    by_image, by_text = rank(sim, args.top_k), rank(sim.T, args.top_k)
    if args.json:
        _emit({
            "image_to_text": [
                {"image": p, "matches": [{"text": texts[j], "score": round(s, 6)} for j, s in row]}
                for p, row in zip(paths, by_image)
            ],
            "text_to_image": [
                {"text": t, "matches": [{"image": paths[j], "score": round(s, 6)} for j, s in row]}
                for t, row in zip(texts, by_text)
            ],
        })
    else:
        print("# images -> texts")
        for p, row in zip(paths, by_image):
            print(p)
            for r, (j, s) in enumerate(row, 1):
                print(f"  {r}\t{s:+.4f}\t{_one_line(texts[j])}")
        print("# texts -> images")
        for t, row in zip(texts, by_text):
            print(_one_line(t))
            for r, (j, s) in enumerate(row, 1):
                print(f"  {r}\t{s:+.4f}\t{paths[j]}")
        sys.stdout.flush()
    return 1 if failed else 0
