"""Weight-only int8 decoding: the two roads side by side, and what int8 does to a trained model's captions.

    python -m benchmarks.int8_decode [--iters 15] [--threads 2]              # the products
    python -m benchmarks.int8_decode --model runs/demo/model [--images 300]  # + caption agreement

Products: the 37 one-token products of `make bench`'s small decoder (benchmarks.decode_kernels), at 1 and
16 rows, medians of interleaved rounds: fp32 through mmgpt.speed.kernels.rows_linear, int8 through
mmgpt.speed.kernels.rows_linear_int8 (fp32 activations, the road mmgpt takes), and torch's
`aten._weight_int8pack_mm` with fp32 and with bf16 activations (the other road), plus MKL's addmm.

Agreement (`--model`, e.g. what `make demo` wrote): greedy captions of the shapes test images by the model
in fp32 and loaded with quantize="int8": the fraction that are identical, and each one's exact match
(on a CPU with AVX-512 VNNI the int8 products round the activations to int8 too; MMGPT_KERNELS_VNNI=0
keeps them fp32).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.decode_kernels import decoder_shapes
from benchmarks.run import interleaved_medians
from mmgpt.speed import kernels
from mmgpt.speed.quantize import quantize_weight


def product_fns(rows: int) -> dict:
    torch.manual_seed(0)
    weights = [(torch.randn(i, o) * 0.02, torch.randn(o) * 0.02) for i, o in decoder_shapes()]
    xs = {n: torch.randn(rows, n) for n in {i for i, _ in decoder_shapes()}}
    quant = [(quantize_weight(w, dim=0), b) for w, b in weights]  # ((in, out) int8, (out,)), bias
    fns = {"addmm fp32 (MKL)": [(lambda x, w=w, b=b: torch.addmm(b, x, w), xs[w.shape[0]]) for w, b in weights]}
    if kernels.available():
        fns["mmgpt.speed.kernels fp32"] = [(kernels.rows_linear(w, b), xs[w.shape[0]]) for w, b in weights]
        fns["mmgpt.speed.kernels int8 (fp32 activations)"] = [(kernels.rows_linear_int8(q, s, b), xs[q.shape[0]])
                                                        for (q, s), b in quant]
    packed = [(q.t().contiguous(), s, b) for (q, s), b in quant]  # (out, in) int8, as _weight_int8pack_mm takes
    mm = torch.ops.aten._weight_int8pack_mm
    fns["_weight_int8pack_mm, fp32 activations"] = [
        (lambda x, w=w, s=s, b=b: mm(x, w, s).add_(b), xs[w.shape[1]]) for w, s, b in packed]
    packed_bf16 = [(w, s.bfloat16(), b.bfloat16()) for w, s, b in packed]
    fns["_weight_int8pack_mm, bf16 activations"] = [
        (lambda x, w=w, s=s, b=b: mm(x, w, s).add_(b), xs[w.shape[1]].bfloat16()) for w, s, b in packed_bf16]
    return {name: (lambda fs=fs: [f(x) for f, x in fs]) for name, fs in fns.items()}


def time_products(rows: int, iters: int) -> dict:
    """Median ms of the 37 products per road, interleaved rounds (order rotating)."""
    return {name: 1e3 * t for name, t in interleaved_medians(product_fns(rows), iters, warmup=1).items()}


def agreement(model_dir: str, images: int = 300, batch: int = 16) -> dict:
    """Greedy captions of `images` shapes test images, fp32 against int8 (same folder, loaded twice), in
    batches of 16: what the int8 kernels decode (more rows than kernels.MAX_ROWS go to torch's products
    on the dequantized weights; until 2026-12-02 this ran batches of 50, so it compared those)."""
    from mmgpt import load
    from train.data.shapes import ShapesDataset

    test = ShapesDataset("test", images, task_mix={"caption": 1})
    recs = [test[i] for i in range(images)]
    pics, truth = [r["image"] for r in recs], [r["target"] for r in recs]
    fp32 = load(model_dir, device="cpu").caption(pics, batch_size=batch, max_new_tokens=32)
    int8 = load(model_dir, device="cpu", quantize="int8").caption(pics, batch_size=batch, max_new_tokens=32)
    return {"images": images, "identical": sum(a == b for a, b in zip(fp32, int8)) / images,
            "exact_match_fp32": sum(a == t for a, t in zip(fp32, truth)) / images,
            "exact_match_int8": sum(a == t for a, t in zip(int8, truth)) / images,
            "differ": [(a, b) for a, b in zip(fp32, int8) if a != b][:5]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="a trained model folder: also measure caption agreement fp32 vs int8")
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_fp32 = sum(i * o for i, o in decoder_shapes()) * 4
    print(f"| the 37 products ({n_fp32 / 1e6:.0f} MB fp32, {n_fp32 / 4e6:.0f} MB int8) | ms, 1 row | ms, 16 rows |  "
          f"({args.iters} interleaved rounds, {args.threads} threads)")
    print("|---|---|---|")
    one, sixteen = time_products(1, args.iters), time_products(16, args.iters)
    for name in one:
        print(f"| {name} | {one[name]:.2f} | {sixteen[name]:.2f} |")
    if args.model:
        print(agreement(args.model, args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
