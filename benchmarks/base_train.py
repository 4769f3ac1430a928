"""Base-size training on the CPU: mmgpt's `base` shape (ViT-B/16 + a GPT-2 124M-sized decoder with
cross-attention, random weights) against transformers' VisionEncoderDecoder of the same size.

Each model trains in a fresh process (its own peak RSS, VmHWM): one warm-up step, then timed steps of
a batch of 224-px images and 32-token captions with fused AdamW; mmgpt also with activation
checkpointing (what `activation_checkpointing: true` turns on in training). mmgpt runs ITC + LM
(unimodal_layers=0, as configs/model/base.json: an image-free decoder pass for the text embedding,
then the captioning pass); VED runs the captioning loss alone.

    python -m benchmarks.base_train [--steps 3] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.run import Size, _status_mb, train_step_fn

# ViT-B/16 at 224 px and GPT-2 124M (12 x 768, GPT-2's vocabulary)
BASE = Size("base", 224, 16, 768, 12, 12, 50257, 32, 4)
KINDS = ("mmgpt", "mmgpt-checkpointing", "ved")


def child(kind: str, steps: int, batch: int, threads: int) -> dict:
    """Train `kind` for 1 + `steps` steps in this process; -> samples/s and peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = replace(BASE, batch=batch)
    floor = _status_mb("VmRSS")
    model = None
    if kind.startswith("mmgpt"):
        from benchmarks.run import build_mmgpt

        model = build_mmgpt(s, unimodal=0)
        if kind == "mmgpt-checkpointing":
            model.decoder.activation_checkpointing_enable()
    model, step, _ = train_step_fn("ved" if kind == "ved" else "mmgpt", s, model)
    params = sum(p.numel() for p in model.parameters())
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    return {"kind": kind, "samples_per_s": batch / seconds, "step_s": seconds, "params_m": params / 1e6,
            "rss_mb": _status_mb("VmHWM"), "floor_mb": floor}


def measure(steps: int = 3, batch: int = 4, threads: int = 2, kinds=KINDS) -> list[dict]:
    root = Path(__file__).resolve().parent.parent
    out = []
    for kind in kinds:
        run = subprocess.run([sys.executable, "-m", "benchmarks.base_train", "--child", kind, "--steps", str(steps),
                              "--batch", str(batch), "--threads", str(threads)],
                             capture_output=True, text=True, check=True, cwd=root)
        out.append(json.loads(run.stdout.strip().splitlines()[-1]))
    return out


def base_rows(steps: int = 3, batch: int = 4, threads: int = 2) -> tuple[list[tuple], list[dict]]:
    """Rows for benchmarks/run.py's table, and the measurements."""
    got = measure(steps, batch, threads)
    rows = [(f"train base (batch {batch}, {threads} threads)", r["kind"],
             f"{r['samples_per_s']:.2f} samples/s, peak RSS {r['rss_mb']:.0f} MB",
             f"{r['step_s']:.1f} s/step, {r['params_m']:.0f}M parameters") for r in got]
    return rows, got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.threads)))
        return 0
    rows, _ = base_rows(args.steps, args.batch, args.threads)
    print("| measurement | model | value | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
