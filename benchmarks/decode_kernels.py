"""What one greedy token costs at batch 1: the small size's decoder weights read once, by each CPU kernel torch
offers for a one-row product, against streaming the same bytes with a sum.

    python -m benchmarks.decode_kernels [--iters 15] [--threads 2]

The decoder of `make bench`'s small size (6 blocks of width 384 with cross-attention, LM head over 8000
tokens) holds 62 MB of fp32 weights that every new token reads once: 37 products of one row. Prints, per
kernel, milliseconds for all 37 products and the GB/s at which that reads the weights (medians of
interleaved rounds), then the GB/s of a plain sum over 256 MB (what memory can stream) and of a sum over
7 MB (what the 32 MB L3 cache can feed). Writes nothing; docs/performance.md quotes a run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmgpt.speed import kernels
from mmgpt.speed.plan import linear as _linear
from mmgpt.speed.plan import packed_linear as _packed_linear
from mmgpt.speed.plan import split_linear as _split_linear

D, LAYERS, VOCAB = 384, 6, 8000


def decoder_shapes() -> list[tuple[int, int]]:
    """(in, out) of every product one token runs: per block qkv, proj, cross q, cross proj, fc, fc proj."""
    block = [(D, 3 * D), (D, D), (D, D), (D, D), (D, 4 * D), (4 * D, D)]
    return block * LAYERS + [(D, VOCAB)]


def _embedding_bag(weight: torch.Tensor, bias: torch.Tensor):
    """y = sum_k x_k W[k] as an embedding bag with per-sample weights (fbgemm's row-streaming kernel),
    the columns split in two bags so that two threads share it."""
    n_in, n_out = weight.shape
    half = n_out // 2
    table = torch.cat([weight[:, :half], weight[:, half:]], 0).contiguous()  # (2 in, out/2)
    idx, offsets = torch.arange(2 * n_in), torch.tensor([0, n_in])
    return lambda x: F.embedding_bag(idx, table, offsets, mode="sum",
                                     per_sample_weights=x[0].repeat(2)).view(1, n_out).add_(bias)


def _mv(weight: torch.Tensor, bias: torch.Tensor):
    w_t = weight.t().contiguous()  # (out, in)
    return lambda x: torch.addmv(bias, w_t, x[0]).view(1, -1)


KERNELS = {
    "addmm (MKL; fastgen one thread)": _linear,
    "split halves (fastgen 2 threads)": _split_linear,
    "addmv (MKL gemv)": _mv,
    "oneDNN packed": _packed_linear,
    "embedding_bag (fbgemm)": _embedding_bag,
}
if kernels.available():  # fastgen's product where it builds
    KERNELS["mmgpt.speed.kernels.rows_linear (AVX2 panels)"] = kernels.rows_linear


def measure(iters: int) -> tuple[dict, int]:
    torch.manual_seed(0)
    weights = [(torch.randn(i, o) * 0.02, torch.randn(o) * 0.02) for i, o in decoder_shapes()]
    n_bytes = sum(w.numel() * 4 for w, _ in weights)
    xs = {n: torch.randn(1, n) for n in (D, 4 * D)}
    runs = {}
    for name, make in KERNELS.items():
        fns = [(make(w, b), xs[w.shape[0]]) for w, b in weights]
        ref = [torch.addmm(b, xs[w.shape[0]], w) for w, b in weights]
        for (f, x), r in zip(fns, ref):
            torch.testing.assert_close(f(x), r, atol=1e-4, rtol=1e-4)

        def run(fns=fns):
            for f, x in fns:
                f(x)

        runs[name] = run
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(iters):  # interleaved, the order rotating
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}, n_bytes


def stream_gb_s(mb: float, reps: int) -> float:
    x = torch.ones(int(mb * 2**18))
    x.sum()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 * reps / statistics.median(ts) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res, n_bytes = measure(args.iters)
    print(f"| one-row kernel | ms for the 37 products ({n_bytes / 1e6:.0f} MB) | GB/s |  "
          f"({args.iters} interleaved rounds, {args.threads} threads)")
    print("|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {1e3 * t:.2f} | {n_bytes / t / 1e9:.1f} |")
    dram, l3 = stream_gb_s(256, 1), stream_gb_s(7, 16)
    print(f"| sum over 256 MB (memory) | {1e3 * n_bytes / dram / 1e9:.2f} | {dram:.1f} |")
    print(f"| sum over 7 MB (in L3) | {1e3 * n_bytes / l3 / 1e9:.2f} | {l3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
