"""The training loop: one Accelerate loop from one CPU to many GPUs, with exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset

from mmgpt.model_card import write_run_cards
from train.checkpoint import (
    DiskFull,
    disk_full_message,
    is_disk_full,
    latest_checkpoint,
    list_checkpoints,
    previous_checkpoint,
    save_checkpoint,
    truncate_log_after,
    unreadable_file,
    unreadable_random_states,
    write_folder_atomically,
    writes_files,
)
from train.collate import MODEL_KEYS, Collator
from train.config import ConfigError, TrainConfig, to_dict, usable_trackers
from train.data.bad import BadDataCounter, DataError
from train.parts import FeatureCache, apply_freezing_and_lora, export_model, lr_lambda, param_groups

_STEP_DELAY = float(os.environ.get("MMGPT_TEST_STEP_DELAY", "0") or 0)


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, too much bad data); the message says why."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run after a checkpoint of its last finished step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}; continue with resume=latest" if checkpoint else "no checkpoint written"
        super().__init__(f"{name} at step {step}: {where}")


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # bf16 on this kind of CPU is ~8x slower than fp32


def build_sources(specs, grouped: bool = True, seed: int = 0):
    """One data set from source specs; several with weights (a `weight` key, `a::b`) are mixed by
    train.data.mix (seeded by `seed`)."""
    from train.data import build_source
    from train.data.sources import parse_source

    if isinstance(specs, str):
        specs = specs.split("::")  # open_clip's a::b
    if isinstance(specs, dict):
        specs = [specs]
    sets, weights = [], []
    for spec in specs:
        spec = parse_source(spec) if isinstance(spec, str) else dict(spec)
        weights.append(float(spec.pop("weight", 1.0)))
        if spec.get("format") == "shapes" and grouped:
            spec.setdefault("grouped", True)
        if spec.get("format") in ("webdataset", "wds"):
            # Every process reads the whole stream (same order) and Accelerate hands each its share of
            # every batch: equal step counts on all processes, and one tokenizer sample for all.
            spec.setdefault("rank", 0)
            spec.setdefault("world_size", 1)
        sets.append(build_source(spec))
    if len(sets) == 1:
        return sets[0]
    from train.data.mix import MixedStream, Upsampled

    if any(isinstance(d, IterableDataset) for d in sets):  # drawn at random in proportion to the weights
        return MixedStream(sets, weights, seed)
    return ConcatDataset(sets) if all(w == 1 for w in weights) else Upsampled(sets, weights)


def _tokenizer_texts(dataset, limit: int) -> list[str]:
    from mmgpt.processor import DEFAULT_TEMPLATES

    texts = []
    if isinstance(dataset, IterableDataset):  # streamed: the first records
        items = iter(dataset)
    else:
        n = len(dataset)
        items = (dataset[i] for i in range(0, n, max(1, n // max(1, limit))))
    for item in items:
        for r in item if isinstance(item, list) else [item]:
            if isinstance(r, dict) and r.get("task") == "chat":  # a conversation: its turns' texts
                texts += [p["text"] for m in r["messages"] for p in m["content"] if p["type"] == "text"]
            elif isinstance(r, dict):
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
        from pathlib import Path

        from mmgpt.api import ModelLoadError, check_model_folder

        if Path(cfg.model.path).is_dir():  # what the folder lacks or holds wrong, in one line
            try:
                check_model_folder(Path(cfg.model.path), f"model.path {cfg.model.path!r}")
            except ModelLoadError as err:
                raise ConfigError(str(err)) from None
        try:
            model = MMGPTModel.from_pretrained(cfg.model.path, attn_implementation=cfg.model.attn_implementation)
            processor = MMGPTProcessor.from_pretrained(cfg.model.path)
        except OSError as err:  # no folder, no weights in it
            raise ConfigError(f"model.path {cfg.model.path!r}: not a model folder mmgpt can load ({_first_line(err)}); give "
                              "the model folder of an earlier run (OUT/model)") from None
        except ValueError as err:  # e.g. a config of another model type
            raise ConfigError(f"model.path {cfg.model.path!r}: {_first_line(err)}") from None
        differ = _differences(cfg.model.overrides, model.config.to_dict())
        if differ:  # the saved model's own config decides its shape: say which overrides are not applied
            warnings.warn(f"model.overrides: {', '.join(differ)} not applied: the model in model.path "
                          f"{cfg.model.path!r} keeps its own config (build a new model from model.preset to change "
                          "them)", stacklevel=2)
        o = cfg.objectives  # this run's losses, not the ones the model was trained with
        model.config.itc_weight, model.config.lm_weight = o.itc_weight, o.lm_weight
        model.config.label_smoothing, model.config.bow_weight = o.label_smoothing, o.bow_weight
        return model, processor
    try:
        mc = MMGPTConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.preset / model.overrides: {err}") from None
    mc.itc_weight, mc.lm_weight = cfg.objectives.itc_weight, cfg.objectives.lm_weight
    mc.label_smoothing = cfg.objectives.label_smoothing
    mc.bow_weight = cfg.objectives.bow_weight
    texts = None if mc.text_pretrained else _tokenizer_texts(train_set, cfg.model.tokenizer_texts)
    try:
        return build_model(mc, texts=texts, attn_implementation=cfg.model.attn_implementation)
    except ValueError as err:  # a model option the chosen parts cannot take (e.g. unimodal_layers)
        raise ConfigError(f"model: {err}") from None
    except OSError as err:  # transformers' "couldn't connect to the hub" / "not a folder or model id"
        first = _first_line(err)
        raise ConfigError(
            f"model.preset {cfg.model.preset!r}: could not load its pretrained parts ({first}); without a "
            "reachable hub give local folders: model.overrides.vision_pretrained=DIR "
            "model.overrides.text_pretrained=DIR") from None


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (transformers' run to many), or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _lora_shape(cfg: TrainConfig) -> dict:
    """The LoRA settings that decide the model's parameters (dropout does not; off is off whatever r says)."""
    lo = cfg.lora
    return {"enabled": False} if not lo.enabled else {"enabled": True, "r": lo.r, "alpha": lo.alpha,
                                                       "target_modules": lo.target_modules}


def _differences(overrides: dict, config: dict, prefix: str = "") -> list[str]:
    """`key=value` for each override (nested dicts key by key) that the config does not already have;
    compared as JSON (a tuple equals a list), None (a default) equals anything."""
    out = []
    for key, value in overrides.items():
        have = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict) and isinstance(have, dict):
            out += _differences(value, have, f"{prefix}{key}.")
        elif value is not None and json.loads(json.dumps(have, default=str)) != json.loads(json.dumps(value, default=str)):
            out.append(f"{prefix}{key}={value!r} (the model has {have!r})")
    return out


def _logit_scale(model) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else None


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(cfg: TrainConfig, accelerator=None) -> dict:
    """Train per `cfg`; returns a summary dict. Writes OUT/metrics.jsonl, OUT/checkpoints, OUT/model.
    A full disk anywhere is one TrainingError line: "no space left on DEVICE at PATH: ..."."""
    try:
        return _run_training(cfg, accelerator)
    except DiskFull as err:  # a checkpoint or the model: the partial folder is already removed
        raise TrainingError(str(err)) from None
    except Exception as err:
        if not is_disk_full(err, Path(cfg.output_dir)):
            raise
        raise TrainingError(disk_full_message(err, Path(cfg.output_dir), "free some space, then continue with "
                                              "resume=latest")) from None


def _run_training(cfg: TrainConfig, accelerator=None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = _resume_point(cfg, ckpt_dir)
    _check_output_dir(cfg, out, resume_from)
    if accelerator is None:
        _reset_accelerator_state()
        accelerator = Accelerator(
            mixed_precision=_precision(cfg),
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=usable_trackers(cfg.trackers) or None,  # one not installed: warned at the config check
            # save_on_each_node: machines without a shared file system each write checkpoints and the model
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"),
                                                save_on_each_node=cfg.save_on_each_node),
            # dispatch_batches=False: every process reads a streamed source itself and Accelerate keeps
            # its share of each batch (dispatching read every batch on process 0 and sent it out)
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False),
            step_scheduler_with_optimizer=False,
        )
    # Muon gathers each sharded matrix whole (FSDP2's DTensors, train/optim.py); FSDP1's flat parameters and
    # DeepSpeed's partitions hide the matrices from it
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    fsdp2 = accelerator.distributed_type.value == "FSDP" and getattr(plugin, "fsdp_version", 1) == 2
    if cfg.optim.name == "muon" and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED") and not fsdp2:
        raise TrainingError(
            f"optim.name: muon orthogonalizes whole weight matrices, but {accelerator.distributed_type.value} "
            "shards them into flat partitions (FSDP1, DeepSpeed); use optim.name=adamw with that launch, FSDP2 "
            "(fsdp_version: 2, configs/accelerate/fsdp.yaml) or DDP (configs/accelerate/ddp.yaml)")
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    main = writes_files(accelerator)  # the main process (with save_on_each_node: each machine's first)
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a fresh run: its own log (and, with overwrite, no old checkpoints)
            if cfg.overwrite:
                for old in (ckpt_dir, out / "best"):
                    shutil.rmtree(old, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()

    train_set = build_sources(cfg.data.train, seed=cfg.seed)
    model, processor = build_model_for(cfg, train_set)
    if cfg.lora.enabled and not cfg.model.path and not model.config.text_pretrained and main:
        print("warning: lora.enabled on a decoder with random weights (model.preset "
              f"{cfg.model.preset!r} names no pretrained decoder): LoRA trains small updates next to frozen "
              "weights, so this decoder will not learn to write; use a pretrained decoder (e.g. "
              "model.preset=smollm2-135m) or lora.enabled=false", flush=True)
    apply_freezing_and_lora(model, cfg)
    collate = Collator(processor, train=True, augment=cfg.data.augment, itc_questions=cfg.objectives.itc_questions)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    # A data set that sets `ordered` (a curriculum over independent random items) is read in order.
    streamed = isinstance(train_set, IterableDataset)  # shuffled by the source (its shuffle buffer)
    dl = DataLoader(
        train_set, batch_size=cfg.batch_size, generator=g, collate_fn=collate,
        shuffle=None if streamed else not getattr(train_set, "ordered", False),
        num_workers=cfg.data.num_workers, drop_last=True, persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=_worker_ignores_stop_signals,
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
    timer = {"t0": time.time()}  # the start of training, moved back by the time a resumed run had trained
    if cfg.time_schedule and cfg.max_minutes:

        def clock():
            return (time.time() - timer["t0"]) / (60 * cfg.max_minutes)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, clock))
    model, optimizer, dl, scheduler = accelerator.prepare(model, optimizer, dl, scheduler)
    # compile: the training step runs a compiled view of the same module (same parameters); checkpoints,
    # evaluation and export keep using `model`, so their keys and behaviour do not depend on it
    train_forward = torch.compile(model) if cfg.compile else model
    if cfg.trackers:
        accelerator.init_trackers("mmgpt", config={k: str(v) for k, v in to_dict(cfg).items()})

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "nonfinite": 0, "bad": {}, "seen_items": 0,
             "train_seconds": 0.0, "best": None}
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        if saved.get("batch_size", cfg.batch_size) != cfg.batch_size:  # the data position counts batches
            raise ConfigError(f"resume: the checkpoint was trained with batch_size={saved['batch_size']}; "
                              f"resume with that batch_size (this run says {cfg.batch_size})")
        lora_now = _lora_shape(cfg)
        lora_then = saved.get("lora", lora_now)
        if lora_then != lora_now:  # the model's parameters differ: lora_* layers, their rank or places
            diff = ", ".join(f"lora.{k}={lora_then.get(k)!r}" for k in lora_now if lora_then.get(k) != lora_now[k])
            raise ConfigError(f"resume: the checkpoint was trained with {diff}; resume with the LoRA settings it was "
                              "trained with")
        try:
            accelerator.load_state(str(resume_from))
        except ValueError as err:  # torch: "loaded state dict has a different number of parameter groups"
            raise ConfigError(f"resume: the checkpoint's optimizer does not fit this run ({err}); resume with the "
                              "optim.name, freeze.* and per-part learning rates it was trained with") from None
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):  # a corrupt file, memory: not a config matter
                _corrupt_checkpoint(resume_from, err)
            raise ConfigError(f"resume: the checkpoint's weights do not fit this run's model ({_first_line(err)}); resume with "
                              "the model, lora.* and freeze.* settings it was trained with") from None
        except Exception as err:  # noqa: BLE001 - a truncated or damaged file (safetensors, pickle, zip errors)
            _corrupt_checkpoint(resume_from, err)
        if main and (why := unreadable_random_states(resume_from, accelerator.process_index)):
            print(f"warning: resume: {why} in {resume_from}: the run goes on with fresh random states, so its data "
                  "order and random augmentations differ from an uninterrupted run's", flush=True)
        if main:
            _set_aside_later_checkpoints(ckpt_dir, resume_from, saved["step"])
        if "seen_items" not in saved:  # written before the count was kept: its bad records can't be judged
            saved["bad"] = {}
        if saved.get("best_metric", cfg.best_metric) != cfg.best_metric:
            saved["best"] = None  # a best value of another metric says nothing about this one
        if saved.get("best") is None and cfg.best_metric and (out / "best" / "best_metric.json").is_file():
            saved["best"] = json.loads((out / "best" / "best_metric.json").read_text()).get(cfg.best_metric)
        state.update(saved)
        if main:
            _drop_log_after(metrics_path, state["step"])  # steps after the checkpoint are trained again
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
    bad = BadDataCounter.from_dict(state["bad"]) if state["bad"] else BadDataCounter()
    # Bad records are judged as distinct records against the distinct records read (a later epoch reads
    # the same ones again): a map-style set holds len() of them (its share on each process), a stream as
    # many as its first epoch read (state["epoch_items"]).
    epoch_items = None if streamed else max(1, len(train_set) // accelerator.num_processes)
    bad_stop = None  # the DataError that stopped the run early (one process: the model is still saved)

    unwrapped = accelerator.unwrap_model(model)
    if cfg.save_on_each_node:  # transformers' save_pretrained writes on global rank 0 only: here on each machine's first
        unwrapped.should_save_on_this_rank = lambda is_main_process: is_main_process
    if not streamed and len(dl) == 0:
        raise TrainingError(f"the training data gives no full batch of {cfg.batch_size}: use a smaller batch_size")
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        # A time budget ends the run first when its steps would outlast it: the bar then counts steps
        # without a total (its ETA would be the step cap's) and the postfix shows the minutes left.
        bar = tqdm(total=None if cfg.max_minutes else cfg.max_steps, initial=state["step"], desc="train",
                   dynamic_ncols=True)
    cache = None
    if cfg.freeze.vision and not cfg.data.augment and cfg.freeze.feature_cache == "memory":
        cache = FeatureCache(cfg.freeze.feature_cache_gb * 2**30)
    t0 = timer["t0"] = time.time() - state["train_seconds"]
    seen_rows, seen_items = 0, state["seen_items"]
    last_log_t, last_log_rows = time.time(), 0
    consecutive_nonfinite = 0
    grad_norm = None
    best = state["best"]
    summary: dict = {}
    stop = False
    signals = _StopSignals() if threading.current_thread() is threading.main_thread() else None
    asked_to_stop = False  # a signal reached some process (all of them agree on it each micro-step)

    def checkpoint(step: int) -> Path:
        state["bad"], state["best"], state["seen_items"] = bad.to_dict(), best, seen_items
        state["best_metric"], state["batch_size"], state["lora"] = cfg.best_metric, cfg.batch_size, _lora_shape(cfg)
        state["train_seconds"] = time.time() - t0
        return save_checkpoint(accelerator, ckpt_dir, step, state, keep=cfg.keep_checkpoints)

    model.train()
    try:
        while not stop and state["step"] < cfg.max_steps:
            if hasattr(dl, "set_epoch"):
                dl.set_epoch(state["epoch"])
            epoch_dl = dl
            if state["micro_in_epoch"]:
                epoch_dl = accelerator.skip_first_batches(dl, state["micro_in_epoch"])
            got_batch = False
            for batch in epoch_dl:
                got_batch = True
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
                    outputs = train_forward(**inputs)
                    loss = outputs.loss
                    ramp = cfg.objectives.itc_warmup_steps
                    if ramp and state["step"] < ramp and outputs.itc_loss is not None:
                        # model loss = lm + w * itc; take back the part of w * itc not yet ramped in
                        loss = loss - (1 - state["step"] / ramp) * cfg.objectives.itc_weight * outputs.itc_loss
                    finite = torch.isfinite(loss.detach()).float()
                    if accelerator.num_processes > 1:
                        # One collective for both: every loss finite (min), and a stop signal anywhere
                        # (min of minus the flags = minus their max), so all processes stop at one step.
                        flags = torch.stack([finite, finite.new_tensor(-float(bool(signals and signals.signum)))])
                        flags = accelerator.reduce(flags, reduction="min")
                        finite, asked_to_stop = flags[0], asked_to_stop or bool(flags[1] < 0)
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
                distinct = _distinct_seen(seen_items, epoch_items or state.get("epoch_items"))
                try:  # judged from 200 records on, or once a whole pass was read (the fraction is then known)
                    bad.check(distinct, cfg.data.max_bad_fraction, min_seen=200, final=state["epoch"] > 0)
                except DataError as err:
                    if accelerator.num_processes > 1:  # each process judges its own share: no common stop
                        raise DataError(f"{err} (no model saved: the processes of a distributed run stop "
                                        "separately; the last checkpoint, if any, holds the run)") from None
                    bad_stop, stop = err, True
                saved = None
                if cfg.eval_every and step % cfg.eval_every == 0 and cfg.data.validation:
                    summary = _evaluate(accelerator, unwrapped, processor, cfg, step, metrics_path)
                    best = _keep_best(accelerator, unwrapped, processor, cfg, summary, best, out, step)
                    model.train()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    saved = checkpoint(step)
                if signals is not None and (signals.signum if accelerator.num_processes == 1 else asked_to_stop):
                    saved = saved or checkpoint(step)
                    accelerator.end_training()  # trackers flush and close
                    raise Interrupted(signals.signum or signal.SIGTERM, step, saved)
                if _STEP_DELAY:
                    time.sleep(_STEP_DELAY)  # test hook: slows steps so a test can kill the run mid-way
                if cfg.max_minutes and (time.time() - t0) / 60 >= cfg.max_minutes:
                    stop = True
                if step >= cfg.max_steps or stop:
                    break
            else:
                if not got_batch and not state["micro_in_epoch"]:
                    raise TrainingError(f"the training data gives no full batch of {cfg.batch_size}: "
                                        "use a smaller batch_size or more data")
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
                if streamed and "epoch_items" not in state:  # a stream's size: what its first pass read
                    state["epoch_items"] = seen_items
    finally:
        if signals is not None:
            signals.restore()

    if bar is not None:
        bar.close()
    train_seconds = time.time() - t0
    accelerator.wait_for_everyone()
    distinct = _distinct_seen(seen_items, epoch_items or state.get("epoch_items"))
    if bad.total and main:
        print(bad.summary(distinct), flush=True)
    if cfg.data.validation and not cfg.eval_every:
        summary = _evaluate(accelerator, unwrapped, processor, cfg, state["step"], metrics_path)
        best = _keep_best(accelerator, unwrapped, processor, cfg, summary, best, out, state["step"])
    if main:
        _export_final(unwrapped, processor, cfg, out, state["step"])
        write_run_cards(out, to_dict(cfg), state["step"], train_seconds)  # README.md cards in OUT/model, OUT/best
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if bad_stop is not None:
        raise DataError(f"stopped at step {state['step']} of {cfg.max_steps}: {bad_stop}\n(the model trained until "
                        f"then on the good records was saved to {out / 'model'})") from None
    try:  # judged on the whole run now (a short run never reached the mid-run check's minimum)
        bad.check(distinct, cfg.data.max_bad_fraction, final=True)
    except DataError as err:
        raise DataError(f"{err}\n(the model trained on the good records was still saved to {out / 'model'})") from None
    if cache is not None and main:
        print(f"feature cache: {cache.hits} hits, {cache.misses} misses, {cache.bytes / 2**20:.0f} MiB", flush=True)
    return {"step": state["step"], "train_seconds": train_seconds, "nonfinite_steps": state["nonfinite"],
            "bad_records": bad.to_dict(), "eval": summary, "model_dir": str(out / "model")}


def _distinct_seen(seen_items: int, epoch_items: int | None) -> int:
    """The distinct records read after ``seen_items`` reads of a set of ``epoch_items`` (None: not known
    yet, the first pass is still being read)."""
    return seen_items if epoch_items is None else min(seen_items, epoch_items)


def _reset_accelerator_state() -> None:
    """Accelerate keeps one precision / accumulation state per process and refuses a second run in the
    same process (a notebook, a sweep) that asks for another ("AcceleratorState has already been
    initialized"). Each run starts from its own config; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _resume_point(cfg: TrainConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to continue from: resume=latest (None when there is none yet: a fresh start) or a
    checkpoint folder, which must hold one."""
    if cfg.resume == "latest":
        return latest_checkpoint(ckpt_dir)
    if not cfg.resume:
        return None
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume: {str(path)!r} is not a checkpoint folder (no trainer_state.json); give "
                          f"resume=latest or a folder such as {ckpt_dir / 'step-100'}")
    return path


def _check_output_dir(cfg: TrainConfig, out: Path, resume_from: Path | None) -> None:
    """A fresh run must not mix with an earlier run's checkpoints: keeping the newest ones would delete its
    own as soon as they are written, and resume=latest would then pick the other run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {str(out)!r} is a file; give a folder")
    if resume_from is None and not cfg.overwrite:
        earlier = [p for p in list_checkpoints(out / "checkpoints") if (p / "trainer_state.json").is_file()]
        if earlier:
            raise ConfigError(
                f"output_dir {str(out)!r} holds checkpoints of an earlier run (up to {earlier[-1].name}): "
                "continue it with resume=latest, start over with overwrite=true (deletes them), or give "
                "another output_dir")


def _set_aside_later_checkpoints(ckpt_dir: Path, resume_from: Path, step: int) -> None:
    """Resuming from step N abandons the checkpoints after N: renamed `abandoned-step-M`, so that pruning
    (which keeps the highest steps) cannot delete this run's new ones and resume=latest cannot pick them."""
    for p in list_checkpoints(ckpt_dir):
        m = int(p.name.split("-")[1])
        if m > step and p.resolve() != resume_from.resolve():
            target = p.with_name(f"abandoned-{p.name}")
            if target.exists():
                shutil.rmtree(target)
            os.replace(p, target)
            print(f"resuming from step {step}: the later {p.name} is set aside as {target.name}", flush=True)


def _drop_log_after(path: Path, step: int) -> None:
    """Forget the log lines of steps after `step` (they are trained again); a torn last line goes too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except ValueError:
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the step in flight, with a checkpoint of it; a second
    signal acts at once (the handlers before these are put back by the first)."""

    def __init__(self):
        self.signum = 0
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """Ctrl-C reaches the data workers too, and `accelerate launch` passes SIGTERM to each process group:
    the workers leave both to the main process, which stops after its step (they end with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _evaluate(accelerator, model, processor, cfg, step, metrics_path) -> dict:
    from train.evaluate import evaluate

    metrics = {}
    # every process reads the same validation records and runs its share of the images (train.dist_eval)
    val = build_sources(cfg.data.validation, grouped=False)
    n = len(val)
    records = _first_images(val, cfg.data.eval_images)
    was_training = model.training
    model.eval()
    result = evaluate(model, processor, records, device=accelerator.device, caption_scorers=("bleu", "cider"))
    if was_training:
        model.train()
    if writes_files(accelerator):
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        _log(metrics_path, {"step": step, "eval": metrics, "validation_records": n})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        shown = (f"{k}={int(v)}" if k.startswith(("num_", "bad_")) else f"{k}={v:.3f}"  # counts as counts
                 for k, v in metrics.items() if "/" not in k)
        print(f"step {step}: " + ", ".join(shown), flush=True)
    accelerator.wait_for_everyone()
    return metrics


def _first_images(dataset, n_images: int) -> list[dict]:
    """Records of the first `n_images` distinct images (all their records)."""
    if hasattr(dataset, "records_for_image"):
        recs = []
        for i in range(min(n_images, dataset.size)):
            recs += dataset.records_for_image(i)
        return recs
    from train.data.records import image_key

    recs, ids = [], set()
    for i in range(len(dataset)):
        r = dataset[i]
        if not isinstance(r, dict):
            continue
        key = image_key(r)
        if key not in ids and len(ids) >= n_images:
            break
        ids.add(key)
        recs.append(r)
    return recs


def _keep_best(accelerator, model, processor, cfg, metrics, best, out: Path, step: int):
    if not cfg.best_metric or not metrics or cfg.best_metric not in metrics:
        return best
    value = metrics[cfg.best_metric]
    if best is None or value > best:
        if writes_files(accelerator):

            def write(folder: Path) -> None:
                export_model(model, processor, folder, cfg.lora.enabled)
                (folder / "best_metric.json").write_text(json.dumps({cfg.best_metric: value, "step": step}) + "\n")

            write_folder_atomically(write, out / "best")  # a full disk keeps the previous best whole
        return value
    return best


def _export_final(model, processor, cfg: TrainConfig, out: Path, step: int) -> None:
    """OUT/model, written whole or not at all. On a full disk the log is cut back to the last checkpoint
    (what resume=latest trains again from), so metrics.jsonl never runs ahead of a model that exists."""
    try:
        write_folder_atomically(lambda folder: export_model(model, processor, folder, cfg.lora.enabled), out / "model")
    except DiskFull as err:
        last = latest_checkpoint(out / "checkpoints")
        truncate_log_after(out / "metrics.jsonl", int(last.name.split("-")[1]) if last else 0)
        then = (f"metrics.jsonl now ends at {last.name}, the last checkpoint; free some space, then continue with "
                "resume=latest" if last else "no checkpoint was written (metrics.jsonl emptied); free some space, "
                "then run again with overwrite=true")
        raise DiskFull(f"{err} at step {step}; {then}") from None


def _corrupt_checkpoint(ckpt: Path, err: BaseException):
    """A checkpoint that does not load: TrainingError naming its unreadable file and the checkpoint
    before it, to resume from instead."""
    found = unreadable_file(ckpt)
    what = f"{found[0]} is unreadable ({found[1]})" if found else f"it does not load ({_first_line(err)})"
    prev = previous_checkpoint(ckpt)
    then = (f"resume from the previous complete checkpoint with resume={prev}" if prev else
            "there is no earlier complete checkpoint: start over with overwrite=true")
    raise TrainingError(f"resume: checkpoint {ckpt}: {what}; {then}") from None
