"""`make bench`: mmgpt against its peers, side by side in one run (medians and ratios).

Peers: transformers' VisionEncoderDecoderModel (ViT + GPT-2) and open_clip's CoCa, same sizes, random
weights, fp32. Writes benchmarks/results/latest.json (one object per target) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.speed.threads import cores_free

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Size:
    name: str
    image: int
    patch: int
    width: int
    layers: int
    heads: int
    vocab: int
    text_len: int
    batch: int


TINY = Size("tiny", 64, 8, 128, 2, 4, 8000, 16, 64)
SMALL = Size("small", 224, 16, 384, 6, 6, 8000, 32, 16)


def median_time(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, iters: int, warmup: int = 2) -> dict:
    """Median seconds of each fn, timed in rounds (one call of each per round, the order rotating).

    Rivals measured minutes apart on a shared machine see different machines; interleaving makes
    them share every slow and fast stretch, so their ratio is far steadier than their rates.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(iters):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak(n: int = 1024, iters: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(median_time(lambda: a @ b, iters) for _ in range(3))
    return 2 * n**3 / best / 1e9  # GFLOP/s


def peak_round(n: int = 1024, reps: int = 8):
    """A round's worth of the peak matmul, to time among the training steps: (fn, FLOPs per call)."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def fn():
        for _ in range(reps):
            torch.mm(a, b)

    return fn, 2 * n**3 * reps


# --- models -------------------------------------------------------------------------------------


def vit_cfg(s: Size) -> dict:
    return dict(image_size=s.image, patch_size=s.patch, hidden_size=s.width, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, intermediate_size=4 * s.width, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def gpt_cfg(s: Size) -> dict:
    return dict(n_embd=s.width, n_layer=s.layers, n_head=s.heads, n_positions=max(64, s.text_len + 32),
                vocab_size=s.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)


def build_mmgpt(s: Size, unimodal: int | None = None):
    from mmgpt import MMGPTConfig, MMGPTModel

    k = s.layers // 2 if unimodal is None else unimodal
    cfg = MMGPTConfig(vision={"backend": "vit", "config": vit_cfg(s)}, text=gpt_cfg(s), adapter={"type": "linear"},
                      projection_dim=s.width, unimodal_layers=k, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    m = MMGPTModel(cfg)
    m.generation_config.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return m


def build_ved(s: Size):
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    enc = ViTModel._from_config(ViTConfig(**vit_cfg(s)), attn_implementation="sdpa")
    dec = GPT2LMHeadModel._from_config(GPT2Config(**gpt_cfg(s), add_cross_attention=True, is_decoder=True),
                                       attn_implementation="sdpa")
    ved = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    ved.config.decoder_start_token_id, ved.config.pad_token_id = 0, 1  # needed to shift labels
    return ved


def build_coca(s: Size):
    import transformers

    transformers.BeamSearchScorer = None  # open_clip 3.3 under transformers 5, else generate() is disabled
    from open_clip.coca_model import CoCa, MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    half = s.layers // 2
    return CoCa(
        embed_dim=s.width,
        multimodal_cfg=MultimodalCfg(context_length=s.text_len, vocab_size=s.vocab, width=s.width, heads=s.heads,
                                     layers=s.layers - half),
        text_cfg=CLIPTextCfg(context_length=s.text_len, vocab_size=s.vocab, width=s.width, heads=s.heads, layers=half,
                             embed_cls=True, output_tokens=True),
        # As open_clip's coca_*.json configs: attentional pooling that also returns the image tokens.
        vision_cfg=CLIPVisionCfg(layers=s.layers, width=s.width, patch_size=s.patch, image_size=s.image,
                                 output_tokens=True, attentional_pool=True, attn_pooler_heads=s.heads),
    )


def batch_for(s: Size, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(s.batch, 3, s.image, s.image, generator=g)
    ids = torch.randint(2, s.vocab, (s.batch, s.text_len), generator=g)
    ids[:, 0] = 0
    ids[:, -1] = 1
    return px, ids


def train_step_fn(kind: str, s: Size, model=None):
    px, ids = batch_for(s)
    if kind in ("mmgpt", "mmgpt-compiled"):
        model = model or build_mmgpt(s)
        labels = ids.clone()
        labels[:, 0] = -100
        fwd = torch.compile(model) if kind == "mmgpt-compiled" else model  # compile: true (inductor)

        def loss_fn():
            return fwd(pixel_values=px, input_ids=ids, labels=labels).loss
    elif kind == "ved":
        model = model or build_ved(s)

        def loss_fn():
            return model(pixel_values=px, labels=ids).loss
    elif kind == "coca":
        from open_clip.loss import CoCaLoss

        model = model or build_coca(s)
        crit = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0)

        def loss_fn():
            out = model(px, ids)
            losses = crit(out["image_features"], out["text_features"], out["logits"], out["labels"],
                          out["logit_scale"])
            return sum(losses)
    else:
        raise ValueError(kind)
    model.train()
    # Every model gets torch's fused AdamW: what mmgpt's trainer and transformers' Trainer (optim
    # "adamw_torch_fused") use; the default on CPU is a per-tensor loop, 3x slower here.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, loss_fn


def flops_per_step(loss_fn) -> float:
    """FLOPs of loss_fn().backward(), or of fn() when it returns no loss (a whole step)."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        loss = loss_fn()
        if loss is not None:
            loss.backward()
    return float(fc.get_total_flops())


def read_bandwidth(mb: int = 256) -> float:
    """GB/s of streaming a tensor far larger than the caches (a sum)."""
    x = torch.ones(mb * 2**18)
    return x.numel() * 4 / median_time(x.sum, 5) / 1e9


def generation_bounds(s: Size, batch: int, new_tokens: int = 24) -> dict:
    """What any decoder loop must pay on top of the encoder: encoder+adapter seconds at this batch (the
    fused inference forward that generate() runs, and Hugging Face's ViT forward that VED runs), and the
    bytes of decoder weights (blocks + LM head) that every step streams."""
    model = build_mmgpt(s).eval()
    px = torch.randn(batch, 3, s.image, s.image)
    with torch.no_grad():
        t = interleaved_medians({"fast": lambda: model.encode_image(px, fast=True),
                                 "hf": lambda: model.encode_image(px)}, 3, warmup=1)
    dec = model.decoder.transformer
    step_bytes = 4 * (sum(p.numel() for p in dec.h.parameters()) + model.decoder.lm_head.weight.numel())
    return {"encoder_s": t["fast"], "encoder_hf_s": t["hf"], "step_bytes": step_bytes, "new_tokens": new_tokens}


def gen_fn(kind: str, s: Size, batch: int, new_tokens: int = 24):
    torch.manual_seed(0)  # the same random weights whatever ran before (a random CoCa can give NaN logits)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(batch, 3, s.image, s.image, generator=g)
    if kind in ("mmgpt", "mmgpt-int8"):
        from mmgpt.speed.quantize import quantize_model

        model = quantize_model(build_mmgpt(s).eval(), "int8" if kind == "mmgpt-int8" else None)
        return lambda: model.generate(pixel_values=px, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False)
    if kind == "ved":
        model = build_ved(s).eval()
        return lambda: model.generate(pixel_values=px, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=1)
    if kind == "coca":
        model = build_coca(s).eval()
        return lambda: model.generate(px, seq_len=new_tokens + 1, generation_type="top_k", top_k=1,
                                      sot_token_id=2, eos_token_id=1, pad_token_id=0, fixed_output_length=True,
                                      min_seq_len=new_tokens)
    raise ValueError(kind)


def feature_cache_ratio(s: Size, iters: int) -> tuple[float, float, float]:
    """Adapter + decoder training with the vision tower frozen: cached features vs recomputing them.

    Also returns the ratio of the two steps' FLOP counts: the speed-up if both ran at the same FLOP/s
    (the encoder's forward is all that the cache removes)."""
    from encoders import EncoderOutput

    model = build_mmgpt(s)
    model.vision.freeze()
    px, ids = batch_for(s)
    labels = ids.clone()
    with torch.no_grad():
        cached = model.vision(px)
    cached = EncoderOutput(patch_tokens=cached.patch_tokens.clone(), pooled=cached.pooled.clone())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def recompute():
        model(pixel_values=px, input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def from_cache():
        model(vision_outputs=cached, input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = interleaved_medians({"recompute": recompute, "cache": from_cache}, iters)
    t_re, t_ca = t["recompute"], t["cache"]
    flop_ratio = flops_per_step(recompute) / flops_per_step(from_cache)
    return s.batch / t_ca, s.batch / t_re, flop_ratio


def data_path_rate(seconds: float = 6.0, workers: int = 2, batch: int = 64) -> float:
    """Images/s delivered by shapes generation + preprocessing + collation through DataLoader workers."""
    from torch.utils.data import DataLoader

    from mmgpt import build_model
    from train.collate import Collator
    from train.data import ShapesDataset

    ds = ShapesDataset("train", 100000, task_mix={"caption": 1, "vqa": 3}, grouped=True)
    _, proc = build_model("tiny", texts=[r["target"] for i in range(50) for r in ds[i]])
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=Collator(proc))
    it = iter(dl)
    next(it)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        n += next(it)["num_images"]
    return n / (time.perf_counter() - t)


def _status_mb(field: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_child(kind: str, steps: int = 4) -> None:
    """Peak RSS of a fresh process training `kind` (small), and the part of it above the import floor.

    Not ru_maxrss: Linux carries the parent's high-water mark across fork + exec into the child's
    ru_maxrss, so every child reported the benchmark parent's peak (both models read 2354 MB). VmHWM
    belongs to the child's own address space.
    """
    torch.set_num_threads(2)
    import transformers  # noqa: F401  (both peers import it; counted in the floor)

    floor = _status_mb("VmRSS")  # interpreter + torch + transformers
    _, step, _ = train_step_fn(kind, SMALL)
    for _ in range(steps):
        step()
    peak = _status_mb("VmHWM")
    print(json.dumps({"rss_mb": peak, "floor_mb": floor, "above_floor_mb": peak - floor}))


def peak_rss(kind: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--rss-child", kind], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------------


def target(name, ours, peer, ratio, goal, unit, higher=True) -> dict:
    met = ratio >= goal if higher else ratio <= goal
    return {"name": name, "mmgpt": round(ours, 3), "peer": round(peer, 3) if peer is not None else None,
            "ratio": round(ratio, 3), "target": goal, "met": bool(met), "unit": unit}


def generation_targets(iters: int, have_coca: bool) -> tuple[list[dict], list[tuple]]:
    """Greedy generation, small size, batch 1 and 16: mmgpt vs VED (and CoCa), interleaved rounds."""
    targets, rows = [], []
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth:.1f} GB/s", flush=True)
    for batch, goal, goal_int8 in ((1, 3.0, 4.0), (16, 1.8, 2.0)):
        bound = generation_bounds(SMALL, batch)
        fns, first = {}, {}
        for kind in ["mmgpt", "mmgpt-int8", "ved"] + (["coca"] if have_coca else []):
            fn = gen_fn(kind, SMALL, batch)
            try:
                first[kind] = fn()
            except Exception as err:  # a peer's generate failing must not sink the whole run
                print(f"note: {kind} generation failed: {err}", file=sys.stderr)
                continue
            fns[kind] = fn
        free = cores_free(max_age=0.0)  # False: another process holds a core (mmgpt then decodes on one thread)
        t = interleaved_medians(fns, iters, warmup=0)
        rates = {kind: batch * 24 / t[kind] for kind in fns}
        for kind in fns:
            rows.append((f"greedy small b{batch}", kind, f"{rates[kind]:.1f} tokens/s", ""))
            print(rows[-1], flush=True)
        targets.append(target(f"generate_small_b{batch}_int8_vs_ved_fp32", rates["mmgpt-int8"], rates["ved"],
                              rates["mmgpt-int8"] / rates["ved"], goal_int8, "tokens/s"))
        # random weights: near-flat logits, where int8 rounding flips more argmaxes than a trained model's
        same = (first["mmgpt"] == first["mmgpt-int8"]).all(dim=1).float().mean().item()
        targets[-1]["int8_vs_fp32"] = {"rate_ratio": round(rates["mmgpt-int8"] / rates["mmgpt"], 3),
                                       "identical_sequences_random_weights": round(same, 3)}
        targets.append(target(f"generate_small_b{batch}_vs_ved", rates["mmgpt"], rates["ved"],
                              rates["mmgpt"] / rates["ved"], goal, "tokens/s"))
        # Ceilings on the ratio: the encoder alone (decoding free), and the encoder plus streaming the
        # decoder weights once per token at the measured read bandwidth (fp32, no cache reuse).
        t_ved = batch * 24 / rates["ved"]
        t_stream = bound["new_tokens"] * bound["step_bytes"] / (bandwidth * 1e9)
        targets[-1]["bound"] = {
            "encoder_s": round(bound["encoder_s"], 4), "encoder_hf_vit_s": round(bound["encoder_hf_s"], 4),
            "cores_free_before_rounds": free, "decoder_weight_mb": round(bound["step_bytes"] / 2**20, 1),
            "read_gb_s": round(bandwidth, 2), "ratio_if_decoding_free": round(t_ved / bound["encoder_s"], 3),
            "ratio_if_bandwidth_bound": round(t_ved / (bound["encoder_s"] + t_stream), 3)}
        ceiling = (f"ratio <= {t_ved / bound['encoder_s']:.2f} (decoding free), "
                   f"<= {t_ved / (bound['encoder_s'] + t_stream):.2f} (weights streamed per token)")
        rows.append((f"greedy small b{batch} ceiling", "mmgpt",
                     f"encoder {1e3 * bound['encoder_s']:.0f} ms (HF ViT forward {1e3 * bound['encoder_hf_s']:.0f} ms)",
                     ceiling + ("" if free else "; a core was busy at the start")))
        if "coca" in rates:
            targets.append(target(f"generate_small_b{batch}_vs_coca", rates["mmgpt"], rates["coca"],
                                  rates["mmgpt"] / rates["coca"], 1.0, "tokens/s"))
    trained = Path(__file__).resolve().parent.parent / "runs" / "demo" / "model"  # what `make demo` writes
    if (trained / "model.safetensors").is_file():
        from benchmarks.int8_decode import agreement

        a = agreement(str(trained))  # greedy captions of 300 shapes test images, fp32 vs quantize="int8"
        rows.append(("int8 captions vs fp32 (runs/demo/model)", "mmgpt", f"{100 * a['identical']:.1f}% identical",
                     f"exact match fp32 {a['exact_match_fp32']:.3f}, int8 {a['exact_match_int8']:.3f}"))
        targets.append(target("int8_captions_identical_to_fp32", a["identical"], None, a["identical"], 0.99,
                              "fraction of 300 shapes test captions"))
    else:
        print("note: no runs/demo/model (make demo): int8 caption agreement on a trained model skipped",
              file=sys.stderr)
    return targets, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=7, help="timed repetitions per measurement (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-coca", action="store_true")
    ap.add_argument("--only", choices=["generation", "train"],
                    help="run only these rows; prints the tables, leaves results/latest.json as it is")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    have_coca = not args.skip_coca
    if have_coca:
        try:
            build_coca(TINY)
        except Exception as err:  # open_clip missing or incompatible: measure the rest
            print(f"note: CoCa peer unavailable ({err}); pip install open-clip-torch", file=sys.stderr)
            have_coca = False

    if args.only == "generation":
        targets, rows = generation_targets(args.iters, have_coca)
        print_tables(rows, targets)
        return 0
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s, {args.threads} threads", flush=True)
    targets, rows = [], []

    train_rates = {}
    for s in (TINY, SMALL):
        kinds = ["mmgpt", "ved"] if s is TINY else ["mmgpt", "mmgpt-compiled", "ved"] + (["coca"] if have_coca else [])
        steps, flops = {}, {}
        for kind in kinds:
            _, steps[kind], loss_fn = train_step_fn(kind, s)
            # the compiled step does the eager step's FLOPs (counting would trace it under the counter)
            flops[kind] = flops["mmgpt"] if kind == "mmgpt-compiled" else flops_per_step(loss_fn)
        # This machine's clock drifts by up to 1.4x between minutes: the peak matmul is timed in the
        # same rounds as the steps (one call of each per round), so both medians see the same machine.
        peak_fn, peak_flops = peak_round()
        t = interleaved_medians({**steps, "peak": peak_fn}, args.iters if s is SMALL else 2 * args.iters)
        peak_s = peak_flops / t["peak"] / 1e9
        for kind in kinds:
            train_rates[(kind, s.name)] = (s.batch / t[kind], flops[kind] / t[kind] / 1e9 / peak_s)
            rows.append((f"train {s.name}", kind, f"{s.batch / t[kind]:.1f} samples/s",
                         (f"MFU {100 * flops[kind] / t[kind] / 1e9 / peak_s:.0f}% (peak {peak_s:.0f} GFLOP/s in "
                         f"these rounds, {peak:.0f} at the start)")))
            print(rows[-1], flush=True)
        del steps
        ours, peer = train_rates[("mmgpt", s.name)][0], train_rates[("ved", s.name)][0]
        targets.append(target(f"train_{s.name}_itc_lm_vs_ved_caption", ours, peer, ours / peer, 1.0, "samples/s"))
    eager, compiled = train_rates[("mmgpt", "small")][1], train_rates[("mmgpt-compiled", "small")][1]
    mfu = max(eager, compiled)  # the faster of the eager and the compiled (compile: true) step
    targets.append(target("mfu_small", mfu, None, mfu, 0.8, "fraction of matmul peak"))
    targets[-1]["eager"], targets[-1]["compiled"] = round(eager, 3), round(compiled, 3)
    if args.only == "train":
        print_tables(rows, targets)
        return 0

    gen_targets, gen_rows = generation_targets(args.iters, have_coca)
    targets += gen_targets
    rows += gen_rows
    try:  # onnxruntime's greedy b1 beside mmgpt's fp32 path (the `onnx` extra; benchmarks/onnx_bench.py)
        from benchmarks.onnx_bench import onnx_rows

        rows += onnx_rows(args.iters, args.threads)
    except ImportError as err:
        print(f"note: ONNX rows skipped ({err}); pip install -e '.[onnx]'", file=sys.stderr)

    cached, recomputed, flop_ratio = feature_cache_ratio(SMALL, args.iters)
    rows.append(("frozen encoder small", "mmgpt", f"cached {cached:.1f} vs recomputed {recomputed:.1f} samples/s",
                 f"FLOP ratio {flop_ratio:.2f}"))
    # The cache removes the encoder's forward and nothing else: its speed-up is bounded by the two steps' FLOP
    # ratio, so the goal is a share of that bound (issue 21: >= 0.9 of it; 3x was above the bound itself).
    speedup = cached / recomputed
    targets.append(target("feature_cache_small_share_of_flop_bound", cached, recomputed, speedup / flop_ratio, 0.9,
                          "samples/s"))
    targets[-1]["bound"] = {"flop_ratio": round(flop_ratio, 3), "speedup": round(speedup, 3)}

    rss = {k: peak_rss(k) for k in ("mmgpt", "ved")}
    ours, peer = rss["mmgpt"]["rss_mb"], rss["ved"]["rss_mb"]
    note = (f"above the {rss['ved']['floor_mb']:.0f} MB import floor: {rss['mmgpt']['above_floor_mb']:.0f} / "
            f"{rss['ved']['above_floor_mb']:.0f} MB")
    rows.append(("peak RSS train small (VmHWM)", "mmgpt / ved", f"{ours:.0f} / {peer:.0f} MB", note))
    targets.append(target("peak_rss_small", ours, peer, ours / peer, 1.1, "MB", higher=False))
    ours, peer = rss["mmgpt"]["above_floor_mb"], rss["ved"]["above_floor_mb"]
    targets.append(target("peak_rss_small_above_import_floor", ours, peer, ours / peer, 1.1, "MB", higher=False))

    data = data_path_rate()
    consume = train_rates[("mmgpt", "tiny")][0]
    rows.append(("data path (shapes, 2 workers)", "mmgpt", f"{data:.0f} images/s", f"training eats {consume:.0f}"))
    targets.append(target("data_path_vs_tiny_training", data, consume, data / consume, 5.0, "images/s"))

    from benchmarks.search import search_targets  # indexing vs open_clip, query latency and recall

    search_t, search_rows = search_targets(SMALL)
    targets += search_t
    rows += search_rows

    from benchmarks.base_train import base_rows  # ViT-B/16 + GPT-2 124M vs VED: samples/s, peak RSS

    rows += base_rows(threads=args.threads)[0]

    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "matmul_peak_gflops": round(peak, 1), "torch": torch.__version__, "python": platform.python_version(),
               "cpu_count": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"machine": machine, "targets": targets}, indent=2) + "\n")

    print_tables(rows, targets)
    print(f"\nwrote {RESULTS / 'latest.json'}")
    return 0


def print_tables(rows: list[tuple], targets: list[dict]) -> None:
    print("\n| measurement | model | value | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\n| target | mmgpt | peer | ratio | goal | met |\n|---|---|---|---|---|---|")
    for t in targets:
        print(f"| {t['name']} | {t['mmgpt']} | {t['peer']} | {t['ratio']} | {'<=' if t['name'].startswith('peak') or t['unit'] == 'ms' else '>='}"
              f"{t['target']} | {'yes' if t['met'] else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
