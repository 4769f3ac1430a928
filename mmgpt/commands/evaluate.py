"""`mmgpt eval MODEL --data SOURCE`: caption, VQA and retrieval metrics of a model on a data source.

SOURCE is a short form that `train.data.parse_source` reads (`shapes:test:300`, `jsonl:PATH`,
`coco:ANN.json:IMAGES`, a bare path, ...). The training package is imported inside the run function.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmgpt.commands.use import quiet

TASK_CHOICES = ("caption", "vqa", "retrieval", "chat", "all", "classify")  # classify: train/classify_eval.py, shapes only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder (written by save_pretrained) or hub id")
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="data source, e.g. shapes:test:300, jsonl:PATH, coco:ANN.json:IMAGES, or a path")
    parser.add_argument("--task", default="all", choices=TASK_CHOICES, help="what to evaluate (default: all)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="batch size (default: 64)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N", help="evaluate the first N images only")
    parser.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="longest output (default: 24)")
    parser.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam search width (default: 1)")
    parser.add_argument("--no-meteor", action="store_true",
                        help="skip METEOR (it starts a Java VM, which takes seconds)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8: evaluate the model as `--quantize int8` runs it elsewhere (default: none)")


@quiet
def run(args) -> int:
    import warnings

    from mmgpt.cli import UserError, load_model
    from train.data import DataError, DataWarning, build_source, parse_source
    from train.evaluate import evaluate
    from train.metrics import CAPTION_METRICS, MetricsWarning

    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {args.max_images}")
    if args.task == "classify":
        from train.classify_eval import run_classify_eval

        return run_classify_eval(args)
    caught = []  # what the readers and scorers noticed, said as notes below
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always", DataWarning)
        try:
            source = build_source(parse_source(args.data))
        except (DataError, ValueError, OSError) as err:
            raise UserError(f"--data: {err}") from None
    caught += got
    vl = load_model(args.model, device=args.device, quantize=args.quantize)

    tasks = ("caption", "vqa", "retrieval", "chat") if args.task == "all" else (args.task,)
    scorers = tuple(m for m in CAPTION_METRICS if not (args.no_meteor and m == "meteor"))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always", MetricsWarning)
        warnings.simplefilter("always", DataWarning)
        try:
            result = evaluate(vl.model, vl.processor, source, tasks=tasks, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                              max_images=args.max_images, caption_scorers=scorers)
        except DataError as err:
            raise UserError(f"--data: {err}") from None
    caught += got
    said = set()
    for w in caught:
        if issubclass(w.category, (MetricsWarning, DataWarning)) and str(w.message) not in said:
            said.add(str(w.message))
            print(f"mmgpt eval: note: {w.message}", file=sys.stderr)
    m = result.metrics
    if result.conversations:
        print(f"mmgpt eval: note: {result.conversations} conversation records (task chat) are not scored by "
              "--task caption/vqa/retrieval (--task chat or all scores them)", file=sys.stderr)
    if m["num_images"] == 0:
        print_bad(result.bad)
        named = ", named above" if m["bad_records"] else ""
        raise UserError(f"--data: {args.data} gave no usable records ({m['bad_records']} bad{named})")
    if "vqa" in tasks and m["num_questions"] == 0 and args.task != "all":
        print("mmgpt eval: note: the data has no questions; no VQA metrics", file=sys.stderr)
    rules = result.vqa_rules
    if rules.get("any_of_k_answers"):  # the official rule is defined for 10 answers: say what the others got
        print(f"mmgpt eval: note: VQA accuracy: {rules['any_of_k_answers']} questions with 2-9 or over 10 reference "
              "answers scored 1 when the answer matches any of them (the official VQAv2 rule, used for the "
              f"{rules['official_10_answers']} with exactly 10, is defined for 10; {rules['one_answer']} with one "
              "answer: exact match); docs/guide.md, 'VQA accuracy'", file=sys.stderr)
    print_bad(result.bad)
    out = dict(m, bad=result.bad.records, **({"vqa_rules": rules} if rules else {})) if args.json else None
    print(json.dumps(out) if args.json else result.table(), flush=True)
    return 0


def print_bad(bad) -> None:
    """The bad records skipped, each named with its reason (as training names them), on stderr."""
    if not bad.total:
        return
    more = bad.total - len(bad.first)
    print(f"mmgpt eval: note: skipped {bad.summary().replace('; first:', ':')}", file=sys.stderr)
    if more > 0:
        print(f"  ... and {more} more", file=sys.stderr)
