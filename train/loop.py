"""The training loop: one Accelerate loop from one CPU to many GPUs, with exact resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from train.checkpoint import latest_checkpoint, save_checkpoint
from train.collate import MODEL_KEYS, Collator
from train.config import TrainConfig, to_dict
from train.data.bad import BadDataCounter
from train.parts import FeatureCache, apply_freezing_and_lora, export_model, lr_lambda, param_groups

_STEP_DELAY = float(os.environ.get("MMGPT_TEST_STEP_DELAY", "0") or 0)


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, too much bad data); the message says why."""


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # bf16 on this kind of CPU is ~8x slower than fp32


def build_sources(specs, grouped: bool = True):
    from train.data import build_source

    if isinstance(specs, dict):
        specs = [specs]
    sets = []
    for spec in specs:
        spec = dict(spec)
        if spec.get("format") == "shapes" and grouped:
            spec.setdefault("grouped", True)
        sets.append(build_source(spec))
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def _tokenizer_texts(dataset, limit: int) -> list[str]:
    from mmgpt.processor import DEFAULT_TEMPLATES

    texts = []
    n = len(dataset)
    step = max(1, n // max(1, limit))
    for i in range(0, n, step):
        item = dataset[i]
        for r in item if isinstance(item, list) else [item]:
            if isinstance(r, dict):
                texts.append(r["target"])
                if r.get("prompt"):
                    texts.append(DEFAULT_TEMPLATES["vqa"].format(question=r["prompt"]) + " " + r["target"])
        if len(texts) >= limit:
            break
    return texts


def build_model_for(cfg: TrainConfig, train_set):
    from mmgpt import MMGPTModel, MMGPTProcessor, build_model
    from mmgpt.config import MMGPTConfig

    if cfg.model.path:
        model = MMGPTModel.from_pretrained(cfg.model.path)
        processor = MMGPTProcessor.from_pretrained(cfg.model.path)
        return model, processor
    mc = MMGPTConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    mc.itc_weight, mc.lm_weight = cfg.objectives.itc_weight, cfg.objectives.lm_weight
    mc.label_smoothing = cfg.objectives.label_smoothing
    mc.bow_weight = cfg.objectives.bow_weight
    texts = None if mc.text_pretrained else _tokenizer_texts(train_set, cfg.model.tokenizer_texts)
    return build_model(mc, texts=texts, attn_implementation=cfg.model.attn_implementation)


def _logit_scale(model) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else None


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(cfg: TrainConfig, accelerator=None) -> dict:
    """Train per `cfg`; returns a summary dict. Writes OUT/metrics.jsonl, OUT/checkpoints, OUT/model."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=_precision(cfg),
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=cfg.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            step_scheduler_with_optimizer=False,
        )
    if cfg.optim.name == "muon" and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise TrainingError(
            f"optim.name: muon orthogonalizes whole weight matrices, but {accelerator.distributed_type.value} "
            "shards them across processes; use optim.name=adamw with that launch (or DDP: "
            "configs/accelerate/ddp.yaml)")
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")

    train_set = build_sources(cfg.data.train)
    model, processor = build_model_for(cfg, train_set)
    apply_freezing_and_lora(model, cfg)
    collate = Collator(processor, train=True, augment=cfg.data.augment, itc_questions=cfg.objectives.itc_questions)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    # A data set that sets `ordered` (a curriculum over independent random items) is read in order.
    dl = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=not getattr(train_set, "ordered", False), generator=g,
        collate_fn=collate,
        num_workers=cfg.data.num_workers, drop_last=True, persistent_workers=cfg.data.num_workers > 0,
    )
    if cfg.optim.name == "muon":
        from train.optim import MuonAdamW

        optimizer = MuonAdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                              eps=cfg.optim.eps, momentum=cfg.optim.muon_momentum)
    else:
        # torch's fused AdamW (one kernel over all tensors; the default is a per-tensor loop on CPU):
        # 3x faster steps on CPU. Left to FSDP / DeepSpeed, which shard the parameters, as they are.
        fused = accelerator.distributed_type.value not in ("FSDP", "DEEPSPEED") and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps, fused=fused or None)
    clock = None
    if cfg.time_schedule and cfg.max_minutes:
        budget_start = time.time()

        def clock():
            return (time.time() - budget_start) / (60 * cfg.max_minutes)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, clock))
    model, optimizer, dl, scheduler = accelerator.prepare(model, optimizer, dl, scheduler)
    if cfg.trackers:
        accelerator.init_trackers("mmgpt", config={k: str(v) for k, v in to_dict(cfg).items()})

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "nonfinite": 0, "bad": {}}
    ckpt_dir = out / "checkpoints"
    resume_from = None
    if cfg.resume == "latest":
        resume_from = latest_checkpoint(ckpt_dir)
    elif cfg.resume:
        resume_from = Path(cfg.resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state.update(json.loads((resume_from / "trainer_state.json").read_text()))
        if main:
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
    bad = BadDataCounter.from_dict(state["bad"]) if state["bad"] else BadDataCounter()

    unwrapped = accelerator.unwrap_model(model)
    n_micro = len(dl)
    if n_micro == 0:
        raise TrainingError(f"the training data gives no full batch of {cfg.batch_size}: use a smaller batch_size")
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        # A time budget ends the run first when its steps would outlast it: the bar then counts steps
        # without a total (its ETA would be the step cap's) and the postfix shows the minutes left.
        bar = tqdm(total=None if cfg.max_minutes else cfg.max_steps, initial=state["step"], desc="train",
                   dynamic_ncols=True)
    metrics_path = out / "metrics.jsonl"
    cache = None
    if cfg.freeze.vision and not cfg.data.augment and cfg.freeze.feature_cache == "memory":
        cache = FeatureCache(cfg.freeze.feature_cache_gb * 2**30)
    t0 = time.time()
    seen_rows = seen_items = 0
    last_log_t, last_log_rows = t0, 0
    consecutive_nonfinite = 0
    grad_norm = None
    best = None
    summary: dict = {}
    stop = False
    model.train()
    while not stop and state["step"] < cfg.max_steps:
        if hasattr(dl, "set_epoch"):
            dl.set_epoch(state["epoch"])
        epoch_dl = dl
        if state["micro_in_epoch"]:
            epoch_dl = accelerator.skip_first_batches(dl, state["micro_in_epoch"])
        for batch in epoch_dl:
            state["micro_in_epoch"] += 1
            bad.add(batch["bad"])
            seen_items += batch["num_images"] + len(batch["bad"])
            if "pixel_values" not in batch:
                continue
            inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
            if cache is not None:
                cached = cache.vision_outputs(unwrapped, inputs["pixel_values"], batch["image_ids"])
                if cached is not None:
                    inputs["vision_outputs"] = cached
                    del inputs["pixel_values"]
            with accelerator.accumulate(model):
                outputs = model(**inputs)
                loss = outputs.loss
                ramp = cfg.objectives.itc_warmup_steps
                if ramp and state["step"] < ramp and outputs.itc_loss is not None:
                    # model loss = lm + w * itc; take back the part of w * itc not yet ramped in
                    loss = loss - (1 - state["step"] / ramp) * cfg.objectives.itc_weight * outputs.itc_loss
                finite = torch.isfinite(loss.detach()).float()
                if accelerator.num_processes > 1:
                    finite = accelerator.reduce(finite, reduction="min")
                if finite.item() < 1:
                    state["nonfinite"] += 1
                    consecutive_nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                    if consecutive_nonfinite >= 5:
                        raise TrainingError(
                            f"{consecutive_nonfinite} non-finite losses in a row at step {state['step']}: "
                            "lower optim.lr, raise optim.warmup_steps, or use precision=no/bf16"
                        )
                    continue
                consecutive_nonfinite = 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            seen_rows += batch["num_rows"]
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.time()
                rec = {
                    "step": step,
                    "epoch": state["epoch"],
                    "loss": loss.item(),
                    "lm_loss": outputs.lm_loss.item() if outputs.lm_loss is not None else None,
                    "itc_loss": outputs.itc_loss.item() if outputs.itc_loss is not None else None,
                    "bow_loss": outputs.bow_loss.item() if outputs.bow_loss is not None else None,
                    "lr": scheduler.get_last_lr()[0],
                    # before clipping; a spike here is what precedes a contrastive collapse
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "logit_scale": _logit_scale(unwrapped),
                    "rows_per_s": (seen_rows - last_log_rows) * accelerator.num_processes / max(1e-9, now - last_log_t),
                    "elapsed_s": now - t0,
                }
                last_log_t, last_log_rows = now, seen_rows
                if main:
                    _log(metrics_path, rec)
                    if bar is not None:
                        post = {"loss": f"{rec['loss']:.3f}", "rows_s": f"{rec['rows_per_s']:.0f}"}
                        if cfg.max_minutes:
                            post["min_left"] = f"{max(0.0, cfg.max_minutes - (now - t0) / 60):.1f}"
                        bar.set_postfix(**post)
                accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
            if seen_items >= 200:
                bad.check(seen_items, cfg.data.max_bad_fraction)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                state["bad"] = bad.to_dict()
                save_checkpoint(accelerator, ckpt_dir, step, state, keep=cfg.keep_checkpoints)
            if cfg.eval_every and step % cfg.eval_every == 0 and cfg.data.validation:
                summary = _evaluate(accelerator, unwrapped, processor, cfg, step, metrics_path)
                best = _keep_best(accelerator, unwrapped, processor, cfg, summary, best, out)
                model.train()
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)  # test hook: slows steps so a test can kill the run mid-way
            if cfg.max_minutes and (time.time() - t0) / 60 >= cfg.max_minutes:
                stop = True
            if step >= cfg.max_steps or stop:
                break
        else:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
    if bar is not None:
        bar.close()
    train_seconds = time.time() - t0
    accelerator.wait_for_everyone()
    if bad.total:
        if main:
            print(bad.summary(seen_items), flush=True)
        bad.check(seen_items, cfg.data.max_bad_fraction)
    if cfg.data.validation and not cfg.eval_every:
        summary = _evaluate(accelerator, unwrapped, processor, cfg, state["step"], metrics_path)
        best = _keep_best(accelerator, unwrapped, processor, cfg, summary, best, out)
    if main:
        export_model(unwrapped, processor, out / "model", cfg.lora.enabled)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if cache is not None and main:
        print(f"feature cache: {cache.hits} hits, {cache.misses} misses, {cache.bytes / 2**20:.0f} MiB", flush=True)
    return {"step": state["step"], "train_seconds": train_seconds, "nonfinite_steps": state["nonfinite"],
            "bad_records": bad.to_dict(), "eval": summary, "model_dir": str(out / "model")}


def _evaluate(accelerator, model, processor, cfg, step, metrics_path) -> dict:
    from train.evaluate import evaluate

    metrics = {}
    if accelerator.is_main_process:
        val = build_sources(cfg.data.validation, grouped=False)
        n = len(val)
        records = _first_images(val, cfg.data.eval_images)
        was_training = model.training
        model.eval()
        result = evaluate(model, processor, records, device=accelerator.device, caption_scorers=("bleu", "cider"))
        if was_training:
            model.train()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        _log(metrics_path, {"step": step, "eval": metrics, "validation_records": n})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        print(f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "/" not in k), flush=True)
    accelerator.wait_for_everyone()
    return metrics


def _first_images(dataset, n_images: int) -> list[dict]:
    """Records of the first `n_images` distinct images (all their records)."""
    if hasattr(dataset, "records_for_image"):
        recs = []
        for i in range(min(n_images, dataset.size)):
            recs += dataset.records_for_image(i)
        return recs
    recs, ids = [], set()
    for i in range(len(dataset)):
        r = dataset[i]
        if not isinstance(r, dict):
            continue
        key = r.get("image_id", i)
        if key not in ids and len(ids) >= n_images:
            break
        ids.add(key)
        recs.append(r)
    return recs


def _keep_best(accelerator, model, processor, cfg, metrics, best, out: Path):
    if not cfg.best_metric or not metrics or cfg.best_metric not in metrics:
        return best
    value = metrics[cfg.best_metric]
    if best is None or value > best:
        if accelerator.is_main_process:
            tmp = out / "best.tmp"
            export_model(model, processor, tmp, cfg.lora.enabled)
            final = out / "best"
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
            (final / "best_metric.json").write_text(json.dumps({cfg.best_metric: value}) + "\n")
        return value
    return best
