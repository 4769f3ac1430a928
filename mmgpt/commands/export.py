"""`mmgpt export MODEL --format onnx --out DIR`: write a model folder as ONNX graphs for onnxruntime /
transformers.js (mmgpt.onnx_export), then check them: onnxruntime loads them and their logits match PyTorch's."""

import argparse
import shutil
from pathlib import Path


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("model", metavar="MODEL", help="model folder (or hub id) to export")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if missing)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (at least 14)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check that onnxruntime's logits match PyTorch's")


def run(args) -> int:
    from mmgpt.cli import UserError, load_model

    if args.opset < 14:
        raise UserError(f"--opset must be at least 14, got {args.opset}")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("the ONNX export needs the onnx package: pip install 'mmgpt[onnx]'") from None
    from mmgpt.onnx_export import ExportError, export_onnx

    vl = load_model(args.model, device="cpu")
    try:
        files = export_onnx(vl.model, vl.processor, args.out, opset=args.opset)
    except ExportError as err:
        raise UserError(f"{args.model}: {err}") from None
    except OSError as err:
        raise UserError(f"{err.filename or args.out}: cannot write there ({err.strerror or err}); use another "
                        "--out") from None
    readme = Path(vl.model.name_or_path or "", "README.md")
    if readme.is_file():  # the model card travels with the export
        shutil.copyfile(readme, Path(args.out) / "README.md")
    for f in files:
        print(f"wrote {f} ({f.stat().st_size / 2**20:.1f} MiB)")
    if not args.no_check:
        from mmgpt.onnx_export import parity

        err = parity(vl.model, vl.processor, args.out)
        print(f"onnxruntime vs PyTorch: largest logit difference {err:.2e} (encoder, first step, one cached step; merged decoder and the pair)")
    return 0
