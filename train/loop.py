"""The training loop: one Accelerate loop from one CPU to many GPUs, with exact resume."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from train.checkpoint import latest_checkpoint, save_checkpoint
from train.collate import MODEL_KEYS, Collator
from train.config import TrainConfig, to_dict
from train.data.bad import BadDataCounter

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
    texts = None if mc.text_pretrained else _tokenizer_texts(train_set, cfg.model.tokenizer_texts)
    return build_model(mc, texts=texts, attn_implementation=cfg.model.attn_implementation)


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on 2-D weights only (nanoGPT), one learning rate per part."""
    o = cfg.optim
    part_lr = {"vision": o.lr_vision, "adapter": o.lr_adapter, "decoder": o.lr_decoder}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0]
        lr = part_lr.get(part) or o.lr
        decay = p.ndim >= 2 and "wpe" not in name and "position" not in name
        key = (lr, decay)
        g = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": o.weight_decay if decay else 0.0})
        g["params"].append(p)
    return list(groups.values())


def lr_lambda(cfg: TrainConfig, clock=None):
    """Linear warmup, then cosine to min_lr_ratio. `clock()` -> fraction of the time budget used
    (time_schedule): the cosine then runs on whichever of steps and time is further along."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        if clock is not None:
            t = max(t, min(1.0, clock()))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def apply_freezing_and_lora(model, cfg: TrainConfig):
    if cfg.freeze.vision:
        model.vision.freeze()
    if cfg.freeze.decoder:
        # The decoder's own weights stay; cross-attention (new) keeps learning unless LoRA replaces it.
        for name, p in model.decoder.named_parameters():
            if "crossattention" not in name and "ln_cross_attn" not in name:
                p.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig, inject_adapter_in_model
        from transformers.pytorch_utils import Conv1D

        from train.config import LoraConfig as DefaultLora

        targets = list(cfg.lora.target_modules)
        if targets == DefaultLora().target_modules:  # not set: the decoder type's own attention projections
            targets = list(model.config.lora_target_modules)
        # GPT-2's Conv1D stores its weight as (in, out): peft must transpose it (fan_in_fan_out).
        conv = any(isinstance(m, Conv1D) for n, m in model.decoder.named_modules() if n.rpartition(".")[2] in targets)
        lcfg = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=targets, fan_in_fan_out=conv,
        )
        for p in model.decoder.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(lcfg, model.decoder)
        for name, p in model.decoder.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    if cfg.activation_checkpointing:
        model.decoder.activation_checkpointing_enable()
    return model


def merge_lora(model) -> None:
    """Fold LoRA weights into the base layers and drop the LoRA modules (for export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.decoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.decoder.get_submodule(parent_name) if parent_name else model.decoder
            setattr(parent, child, module.get_base_layer())


class FeatureCache:
    """Outputs of a frozen vision tower per image id (CPU memory, up to a size cap)."""

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.store: dict = {}
        self.hits = self.misses = 0

    def vision_outputs(self, model, pixel_values, image_ids):
        from encoders import EncoderOutput

        if any(i is None for i in image_ids):
            return None
        missing = [j for j, i in enumerate(image_ids) if i not in self.store]
        self.hits += len(image_ids) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                out = model.vision(pixel_values[missing])  # patch_tokens (m, N, Dv), pooled (m, Dv)
            for row, j in enumerate(missing):
                pair = (out.patch_tokens[row].detach(), out.pooled[row].detach())
                fresh[image_ids[j]] = pair
                size = pair[0].numel() * pair[0].element_size() + pair[1].numel() * pair[1].element_size()
                if self.bytes + size <= self.max_bytes:
                    self.store[image_ids[j]] = (pair[0].cpu(), pair[1].cpu())
                    self.bytes += size
        dev = pixel_values.device
        pairs = [fresh.get(i) or self.store[i] for i in image_ids]
        return EncoderOutput(
            patch_tokens=torch.stack([p[0].to(dev) for p in pairs]),  # (B_img, N, Dv)
            pooled=torch.stack([p[1].to(dev) for p in pairs]),  # (B_img, Dv)
        )


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
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")

    train_set = build_sources(cfg.data.train)
    model, processor = build_model_for(cfg, train_set)
    apply_freezing_and_lora(model, cfg)
    collate = Collator(processor, train=True, augment=cfg.data.augment)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    dl = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, generator=g, collate_fn=collate,
        num_workers=cfg.data.num_workers, drop_last=True, persistent_workers=cfg.data.num_workers > 0,
    )
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps)
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

        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="train", dynamic_ncols=True)
    metrics_path = out / "metrics.jsonl"
    cache = None
    if cfg.freeze.vision and not cfg.data.augment and cfg.freeze.feature_cache == "memory":
        cache = FeatureCache(cfg.freeze.feature_cache_gb * 2**30)
    t0 = time.time()
    seen_rows = seen_items = 0
    last_log_t, last_log_rows = t0, 0
    consecutive_nonfinite = 0
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
            inputs = {k: batch[k] for k in MODEL_KEYS}
            if cache is not None:
                cached = cache.vision_outputs(unwrapped, inputs["pixel_values"], batch["image_ids"])
                if cached is not None:
                    inputs["vision_outputs"] = cached
                    del inputs["pixel_values"]
            with accelerator.accumulate(model):
                outputs = model(**inputs)
                loss = outputs.loss
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
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
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
                    "lr": scheduler.get_last_lr()[0],
                    "rows_per_s": (seen_rows - last_log_rows) * accelerator.num_processes / max(1e-9, now - last_log_t),
                    "elapsed_s": now - t0,
                }
                last_log_t, last_log_rows = now, seen_rows
                if main:
                    _log(metrics_path, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", rows_s=f"{rec['rows_per_s']:.0f}")
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
        export = out / "model"
        if cfg.lora.enabled:
            merge_lora(unwrapped)
        unwrapped.save_pretrained(export)
        processor.save_pretrained(export)
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
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            final = out / "best"
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
            (final / "best_metric.json").write_text(json.dumps({cfg.best_metric: value}) + "\n")
        return value
    return best
