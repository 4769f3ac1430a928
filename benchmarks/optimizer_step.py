"""What Muon costs: the demo recipe's training step with AdamW and with Muon, interleaved, same model and batch.

    python -m benchmarks.optimizer_step [--iters 25] [--threads 2]

Prints the median milliseconds of `optimizer.step()` alone and of the whole step (forward, backward,
step) for each, and Muon's ratio to AdamW. fp32, the demo's batch (32 images, a caption and 3
questions each). Writes nothing; docs/training.md (Muon) quotes a run of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from train.collate import Collator
from train.config import load_config
from train.optim import MuonAdamW
from train.parts import param_groups
from train.run_setup import build_model_for, build_sources

RECIPE = "configs/train/shapes-tiny.yaml"


def measure(iters: int, overrides: list[str] | None = None) -> dict:
    cfg = load_config(RECIPE, overrides)
    train_set = build_sources(cfg.data.train)
    torch.manual_seed(0)
    model, processor = build_model_for(cfg, train_set)
    batch = Collator(processor, train=True)([train_set[i] for i in range(cfg.batch_size)])
    o = cfg.optim
    opts = {}
    for name in ("adamw", "muon"):
        groups = param_groups(model, load_config(RECIPE, [*(overrides or []), f"optim.name={name}"]))
        opts[name] = (MuonAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, momentum=o.muon_momentum)
                      if name == "muon" else torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps))
    times = {name: ([], []) for name in opts}

    def step(name):
        t0 = time.perf_counter()
        out = model(**batch)
        opts[name].zero_grad()
        out.loss.backward()
        t1 = time.perf_counter()
        opts[name].step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    names = list(opts)
    for name in names:  # warm-up: creates both optimizers' state
        step(name)
    for r in range(iters):  # interleaved, the order rotating: both see the same slow and fast stretches
        for name in names[r % 2:] + names[:r % 2]:
            whole, opt = step(name)
            times[name][0].append(whole)
            times[name][1].append(opt)
    return {name: {"step_ms": 1000 * statistics.median(w), "optimizer_ms": 1000 * statistics.median(s)}
            for name, (w, s) in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure(args.iters)
    print(f"| optimizer | optimizer.step() ms | whole step ms |  ({args.iters} interleaved steps, {args.threads} threads)")
    print("|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['optimizer_ms']:.1f} | {r['step_ms']:.0f} |")
    print(f"Muon / AdamW whole step: {res['muon']['step_ms'] / res['adamw']['step_ms']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
