"""`mmgpt explain MODEL IMAGE [--question Q] --out PNG`: a caption (or answer) and, for each generated
token, the decoder's cross-attention over the image as a heat map on the picture.

The text goes to stdout; a bad image is one line on stderr and exit status 1; a model folder that is
missing or invalid, or a model whose adapter has no per-patch memory (resampler), is one line and
exit status 2. The rendering lives in `mmgpt.explain`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmgpt.commands.use import _add_common, _load_pipeline, _one_line, _positive, quiet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument("--question", "-q", default=None, metavar="Q",
                        help="explain the answer to this question (default: explain the caption)")
    parser.add_argument("--out", "-o", required=True, metavar="PNG", help="where to write the picture")
    parser.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="longest output (default: 24)")
    parser.add_argument("--panel", type=int, default=192, metavar="PX", help="side of each panel in pixels (default: 192)")


@quiet
def run(args) -> int:
    from PIL import Image

    from encoders import ImageLoadError, load_image
    from mmgpt.cli import UserError
    from mmgpt.explain import ExplainError, explain, render_explanation

    _positive("--max-new-tokens", args.max_new_tokens)
    if args.panel < 32:
        raise UserError(f"--panel must be at least 32, got {args.panel}")
    if args.question is not None and not args.question.strip():
        raise UserError("the question is empty")
    out = Path(args.out)
    if out.suffix and out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {args.out}: unknown picture format {out.suffix!r} (use .png)")
    try:
        image = load_image(args.image)
    except ImageLoadError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 1
    vl = _load_pipeline(args)
    try:
        text, tokens, maps = explain(vl.model, vl.processor, image, question=args.question,
                                     max_new_tokens=args.max_new_tokens)
    except ExplainError as err:
        raise UserError(f"{args.model}: {err}") from None
    except ValueError as err:  # the model refused the question (e.g. longer than its decoder reads)
        raise UserError(str(err)) from None
    sheet = render_explanation(image, text, tokens, maps, panel=args.panel)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out, format=None if out.suffix else "PNG")
    except (OSError, ValueError) as err:
        raise UserError(f"--out {args.out}: cannot write the picture ({err})") from None
    print(_one_line(text), flush=True)
    n = len(tokens)
    print(f"mmgpt explain: wrote {out} ({n} token map{'' if n == 1 else 's'})", file=sys.stderr, flush=True)
    return 0
