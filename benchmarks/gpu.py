"""mmgpt against transformers' VisionEncoderDecoder (ViT + GPT-2) on one CUDA GPU, side by side in one run.

    python -m benchmarks.gpu [--iters 20] [--json PATH]

Same sizes and random weights as `make bench` (small: 224 px / patch 16, width 384, 6 + 6 layers), bf16
autocast with fp32 weights for training (what `precision=bf16` runs), bf16 weights for generation.
Medians of interleaved rounds (each round times every rival once), ratios mmgpt / VED. The CPU
benchmark is `make bench`; this one needs a GPU and is not part of CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from benchmarks.run import SMALL, batch_for, build_mmgpt, build_ved, interleaved_medians


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def train_step(kind: str, size, dev="cuda"):
    torch.manual_seed(0)
    px, ids = (t.to(dev) for t in batch_for(size))
    model = (build_mmgpt(size) if kind == "mmgpt" else build_ved(size)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    labels = ids.clone()
    labels[:, 0] = -100

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if kind == "mmgpt":
                loss = model(pixel_values=px, input_ids=ids, labels=labels).loss
            else:
                loss = model(pixel_values=px, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, _synced(step)


def peak_memory(kind: str, size) -> float:
    """GiB the step's peak allocation reaches above the weights and optimizer state."""
    torch.cuda.empty_cache()
    model, step = train_step(kind, size)
    step()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    del model, step
    torch.cuda.empty_cache()
    return peak / 2**30


def generate_fn(kind: str, size, batch: int, new_tokens: int = 24):
    torch.manual_seed(0)
    px = torch.randn(batch, 3, size.image, size.image, generator=torch.Generator().manual_seed(1))
    px = px.to("cuda", torch.bfloat16)
    if kind == "mmgpt":
        model = build_mmgpt(size).to("cuda", torch.bfloat16).eval()
        kw = {}
    else:
        model = build_ved(size).to("cuda", torch.bfloat16).eval()
        kw = dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=1)
    return _synced(lambda: model.generate(pixel_values=px, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False, **kw))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for batch in (16, 128):
        size = replace(SMALL, batch=batch)
        fns = {k: train_step(k, size)[1] for k in ("mmgpt", "ved")}
        t = interleaved_medians(fns, args.iters, warmup=3)
        mem = {k: peak_memory(k, size) for k in ("mmgpt", "ved")}
        rows.append(dict(what=f"train small b{batch} (samples/s)", mmgpt=batch / t["mmgpt"], ved=batch / t["ved"],
                         ratio=t["ved"] / t["mmgpt"]))
        rows.append(dict(what=f"train small b{batch} step peak (GiB, lower better)", mmgpt=mem["mmgpt"],
                         ved=mem["ved"], ratio=mem["mmgpt"] / mem["ved"]))
        del fns
    for batch in (1, 16):
        fns = {k: generate_fn(k, SMALL, batch) for k in ("mmgpt", "ved")}
        t = interleaved_medians(fns, max(3, args.iters // 4), warmup=2)
        rows.append(dict(what=f"greedy 24 tokens small b{batch} (tokens/s)", mmgpt=24 * batch / t["mmgpt"],
                         ved=24 * batch / t["ved"], ratio=t["ved"] / t["mmgpt"]))
        del fns
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| what | mmgpt | VED | ratio |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['mmgpt']:.4g} | {r['ved']:.4g} | {r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
