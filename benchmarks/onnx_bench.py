"""Greedy batch-1 decoding of the small model on onnxruntime (the `mmgpt export --format onnx` graphs,
mmgpt.onnx_runner) beside mmgpt's own fp32 and int8 paths (MMGPTModel.generate), same random weights, 24 new
tokens, the encoder included: whichever is faster is what to deploy on a CPU.

    python -m benchmarks.onnx_bench [--iters 5] [--threads 2]

`benchmarks.run` adds these rows to `make bench` when onnxruntime is installed (the `onnx` extra).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

NEW_TOKENS = 24


def onnx_rows(iters: int = 5, threads: int = 2) -> list[tuple]:
    from benchmarks.run import SMALL, build_mmgpt, interleaved_medians
    from mmgpt.onnx_export import export_onnx
    from mmgpt.onnx_runner import OnnxVisionLanguage
    from mmgpt.processor import MMGPTProcessor, train_bpe_tokenizer

    torch.manual_seed(0)
    model = build_mmgpt(SMALL).eval()
    processor = MMGPTProcessor(train_bpe_tokenizer(["a small red circle"], vocab_size=300), image_size=SMALL.image)
    px = torch.randn(1, 3, SMALL.image, SMALL.image, generator=torch.Generator().manual_seed(1))
    bos = torch.zeros(1, 1, dtype=torch.long)
    with tempfile.TemporaryDirectory(prefix="mmgpt-onnx-bench-") as out:
        export_onnx(model, processor, out)
        ox = OnnxVisionLanguage(out, threads=threads)
        pixels, ids, mask = px.numpy(), bos.numpy(), torch.ones_like(bos).numpy()

        def ort():
            return ox.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=-1)

        def torch_fp32():
            return model.generate(pixel_values=px, input_ids=bos, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False)

        fns = {"onnxruntime": ort, "mmgpt fp32": torch_fp32}
        try:  # mmgpt's int8 decoder (mmgpt.speed.quantize), where this tree has it
            from mmgpt.speed.quantize import quantize_model

            torch.manual_seed(0)
            q = quantize_model(build_mmgpt(SMALL).eval(), "int8")  # the same weights, then int8
            fns["mmgpt int8"] = lambda: q.generate(pixel_values=px, input_ids=bos, max_new_tokens=NEW_TOKENS,
                                                   min_new_tokens=NEW_TOKENS, do_sample=False)
        except ImportError:
            pass
        t = interleaved_medians(fns, iters, warmup=1)
    rates = {k: NEW_TOKENS / v for k, v in t.items()}
    note = (f"same weights, {threads} threads; onnxruntime / mmgpt fp32 = "
            f"{rates['onnxruntime'] / rates['mmgpt fp32']:.2f}x")
    return [("greedy small b1", k, f"{r:.1f} tokens/s", note) for k, r in rates.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for row in onnx_rows(args.iters, args.threads):
        print(" | ".join(str(x) for x in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
