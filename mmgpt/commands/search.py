"""`mmgpt index build|update`, `mmgpt search` and `mmgpt classify`: the contrastive half of a model as
tools: search an image folder by text or by image, and label images against names the user gives.

torch, transformers and faiss are imported inside the run functions: `mmgpt --help` stays cheap.
"""

from __future__ import annotations

import argparse
import sys

from mmgpt.commands.use import _emit, _load_pipeline, _one_line, _positive, quiet

# --- arguments -------------------------------------------------------------------------------------


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="index every image under a folder",
                       description="Embed every image under DIR (recursively) into a new index folder. Run it "
                       "again on an index it left unfinished to go on where it stopped.")
    b.add_argument("dir", metavar="DIR", help="the image folder")
    b.add_argument("--model", required=True, metavar="MODEL", help="model folder or hub id")
    b.add_argument("--out", required=True, metavar="INDEX", help="index folder to write")
    u = sub.add_parser("update", help="add new and changed images, drop deleted ones",
                       description="Bring INDEX up to date with its folder: new and changed files (by "
                       "content hash) are embedded, deleted ones dropped.")
    u.add_argument("index", metavar="INDEX", help="index folder")
    u.add_argument("--model", default=None, metavar="MODEL",
                   help="where the index's model is now (default: where it was at build time)")
    for p in (b, u):
        p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (default: 64)")
        p.add_argument("--workers", type=int, default=2, metavar="N",
                       help="data-loader processes reading and decoding images (default: 2; 0: none)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        _add_device(p)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="index folder (from mmgpt index build)")
    parser.add_argument("text", nargs="?", default=None, metavar="TEXT", help="what to look for, quoted")
    parser.add_argument("--image", metavar="QUERY", help="an image to find similar ones to (instead of TEXT)")
    parser.add_argument("--top-k", type=int, default=10, metavar="K", help="results (default: 10)")
    parser.add_argument("--exact", action="store_true", help="exact search even on an approximate index")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="where the index's model is now (default: where it was at build time)")
    parser.add_argument("--json", action="store_true", help='one JSON object: {"query", "results": [...]}')
    _add_device(parser)


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (written by save_pretrained) or hub id")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--labels", nargs="+", required=True, metavar="LABEL", help="candidate labels")
    parser.add_argument("--template", action="append", dest="templates", metavar="T",
                        help="prompt template with {} for the label, e.g. 'a photo of a {}' (repeat to "
                        "average several; default: the label alone)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="labels listed per image (default: all)")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"image": ..., "labels": [{"label", "score"}, ...]}')
    _add_device(parser)


# --- index -----------------------------------------------------------------------------------------


def _model_arg(args, model: str | None):
    return argparse.Namespace(model=model, device=args.device, dtype=args.dtype)


@quiet
def run_index(args) -> int:
    from mmgpt.cli import UserError
    from mmgpt.search import SearchIndexError, build, update
    from mmgpt.search.store import Store

    _positive("--batch-size", args.batch_size)
    if args.workers < 0:
        raise UserError(f"--workers must be at least 0, got {args.workers}")
    kw = dict(batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    try:
        if args.action == "build":
            vl = _load_pipeline(_model_arg(args, args.model))
            summary = build(args.dir, vl, args.out, **kw)
            where = args.out
        else:
            model = args.model or Store(args.index).get("model")
            vl = _load_pipeline(_model_arg(args, model))
            summary = update(args.index, vl, **kw)
            where = args.index
    except SearchIndexError as err:
        raise UserError(str(err)) from None
    for line in summary.lines():
        print(line, file=sys.stderr)
    print(f"mmgpt index: {where} holds {summary.files - len(summary.bad)} images", file=sys.stderr)
    return 1 if summary.bad else 0


# --- search ----------------------------------------------------------------------------------------


@quiet
def run_search(args) -> int:
    from mmgpt.cli import UserError
    from mmgpt.search import SearchIndex, SearchIndexError

    _positive("--top-k", args.top_k)
    if (args.text is None) == (args.image is None):
        raise UserError("give a TEXT to look for, or --image QUERY, not both")
    if args.text is not None and not args.text.strip():
        raise UserError("the text is empty")
    try:
        index = SearchIndex(args.index)
    except SearchIndexError as err:
        raise UserError(str(err)) from None
    if not index.complete:
        print(f"mmgpt search: note: the last build or update of {args.index} did not finish; searching the "
              f"{len(index)} images it indexed (run `mmgpt index update {args.index}` to finish it)",
              file=sys.stderr)
    query_image = None
    if args.image is not None:
        from encoders import ImageLoadError, load_image

        try:
            query_image = load_image(args.image)
        except ImageLoadError as err:
            raise UserError(f"--image {err}") from None
    vl = _load_pipeline(_model_arg(args, args.model or index.model))
    try:
        index.check_model(vl)
    except SearchIndexError as err:
        raise UserError(str(err)) from None
    if query_image is not None:
        hits = index.search_image(vl, [query_image], args.top_k, exact=args.exact)[0]
    else:
        hits = index.search_text(vl, [args.text], args.top_k, exact=args.exact)[0]
    if args.json:
        query = {"text": args.text} if args.text is not None else {"image": args.image}
        _emit({"query": query, "results": [h.to_dict(index.root) for h in hits]})
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank}\t{h.score:+.4f}\t{index.root / h.path}")
        sys.stdout.flush()
    return 0


# --- classify --------------------------------------------------------------------------------------


@quiet
def run_classify(args) -> int:
    from mmgpt.cli import UserError
    from mmgpt.commands.use import _batches

    if args.top_k is not None:
        _positive("--top-k", args.top_k)
    labels = list(args.labels)
    if any(not lab.strip() for lab in labels):
        raise UserError("--labels: a label is empty")
    if len(set(labels)) != len(labels):
        raise UserError("--labels: a label is given twice")
    vl = _load_pipeline(args)
    failed = 0
    for good, bad in _batches(args.images, 64):
        failed += bad
        if not good:
            continue
        try:
            results = vl.classify([im for _, im in good], labels, templates=args.templates)
        except ValueError as err:  # a template without {} or one the model cannot read
            raise UserError(str(err)) from None
        for (path, _), ranked in zip(good, results):
            ranked = ranked[: args.top_k] if args.top_k else ranked
            if args.json:
                _emit({"image": path, "labels": [{**r, "score": round(r["score"], 6)} for r in ranked]})
            else:
                best = ", ".join(f"{_one_line(r['label'])} {r['score']:.3f}" for r in ranked)
                print(f"{path}\t{best}", flush=True)
    return 1 if failed else 0

