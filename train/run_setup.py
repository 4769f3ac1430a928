"""Setting up a training run: the accelerator, the output folder, the data, the model, the optimizer and
its schedule, passed through `accelerator.prepare` and held in one `Run` (`setup_run`). The later phases
(train/resume.py, train/loop.py, train/run_outputs.py) read the `Run` and advance its progress fields.

Also the builders that benchmarks and tests use alone: `build_sources` (one data set from source specs)
and `build_model_for` (the model and processor a config asks for).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset

from train.checkpoint import writes_files
from train.collate import Collator
from train.config import ConfigError, TrainConfig, to_dict, usable_trackers
from train.data.bad import BadDataCounter
from train.parts import apply_freezing_and_lora, lr_lambda, param_groups


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, too much bad data); the message says why."""


def _fresh_state() -> dict:
    """What a checkpoint's trainer_state.json holds, at the start of a fresh run."""
    return {"step": 0, "epoch": 0, "micro_in_epoch": 0, "nonfinite": 0, "bad": {}, "seen_items": 0,
            "train_seconds": 0.0, "best": None}


@dataclass
class Run:
    """One training run between its phases: what setting up built, and the progress the loop advances."""

    cfg: TrainConfig
    accelerator: Any
    out: Path  # OUT: metrics.jsonl, checkpoints/, best/, model/
    resume_from: Path | None  # the checkpoint to continue from; None: a fresh run
    main: bool  # this process writes the run's files (with save_on_each_node: each machine's first)
    train_set: Any
    streamed: bool  # an IterableDataset: shuffled by its source, its size known after one pass
    processor: Any
    model: Any  # as prepared (wrapped by DDP / FSDP); checkpoints, evaluation and export see its weights
    unwrapped: Any
    train_forward: Any  # the training step's forward: `model`, or a compiled view of it (compile=true)
    optimizer: Any
    scheduler: Any
    dl: Any
    timer: dict  # {"t0": the start of training}, read by the time schedule's clock
    epoch_items: int | None  # distinct records in one pass on this process (None: a stream, not known yet)
    # Progress: `state` is what a checkpoint holds; the rest is restored from it or lives in this process.
    state: dict = field(default_factory=_fresh_state)
    bad: BadDataCounter = field(default_factory=BadDataCounter)
    best: float | None = None  # the best value of cfg.best_metric so far
    seen_items: int = 0  # records read, bad ones included
    seen_rows: int = 0  # rows (examples) trained on by this process
    last_log_t: float = 0.0
    last_log_rows: int = 0
    consecutive_nonfinite: int = 0
    grad_norm: Any = None  # the last step's norm before clipping
    summary: dict = field(default_factory=dict)  # the last evaluation's metrics
    stop: bool = False
    bad_stop: Exception | None = None  # the DataError that stopped the run early (the model is still saved)
    asked_to_stop: bool = False  # a signal reached some process (all of them agree on it each micro-step)
    signals: Any = None
    bar: Any = None
    cache: Any = None  # train.parts.FeatureCache of frozen vision outputs

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def t0(self) -> float:
        """The start of training, moved back by the time a resumed run had trained."""
        return self.timer["t0"]

    def distinct_seen(self) -> int:
        """The distinct records read so far: bad records are judged against these (a later epoch reads the
        same ones again): a map-style set holds len() of them (its share on each process), a stream as many
        as its first epoch read (state["epoch_items"])."""
        epoch_items = self.epoch_items or self.state.get("epoch_items")
        return self.seen_items if epoch_items is None else min(self.seen_items, epoch_items)


def setup_run(cfg: TrainConfig, accelerator, resume_from: Path | None) -> Run:
    """The first phase: the accelerator (a new one unless given), the output folder, the data loader, the
    model (frozen parts, LoRA), the optimizer and its schedule, all prepared by Accelerate."""
    from accelerate.utils import set_seed

    out = Path(cfg.output_dir)
    if accelerator is None:
        accelerator = _make_accelerator(cfg, out)
    _check_optimizer_fits(cfg, accelerator)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    main = writes_files(accelerator)  # the main process (with save_on_each_node: each machine's first)
    _prepare_output_dir(cfg, accelerator, out, resume_from, main)

    train_set = build_sources(cfg.data.train, seed=cfg.seed)
    model, processor = build_model_for(cfg, train_set)
    if cfg.lora.enabled and not cfg.model.path and not model.config.text_pretrained and main:
        print("warning: lora.enabled on a decoder with random weights (model.preset "
              f"{cfg.model.preset!r} names no pretrained decoder): LoRA trains small updates next to frozen "
              "weights, so this decoder will not learn to write; use a pretrained decoder (e.g. "
              "model.preset=smollm2-135m) or lora.enabled=false", flush=True)
    apply_freezing_and_lora(model, cfg)
    streamed = isinstance(train_set, IterableDataset)  # shuffled by the source (its shuffle buffer)
    dl = _data_loader(cfg, train_set, processor, streamed)
    optimizer = _optimizer(cfg, model, accelerator)
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
    return Run(cfg=cfg, accelerator=accelerator, out=out, resume_from=resume_from, main=main, train_set=train_set,
               streamed=streamed, processor=processor, model=model, unwrapped=accelerator.unwrap_model(model),
               train_forward=train_forward, optimizer=optimizer, scheduler=scheduler, dl=dl, timer=timer,
               epoch_items=None if streamed else max(1, len(train_set) // accelerator.num_processes))


def _make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    _reset_accelerator_state()
    return Accelerator(
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


def _check_optimizer_fits(cfg: TrainConfig, accelerator) -> None:
    # Muon gathers each sharded matrix whole (FSDP2's DTensors, train/optim.py); FSDP1's flat parameters and
    # DeepSpeed's partitions hide the matrices from it
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    fsdp2 = accelerator.distributed_type.value == "FSDP" and getattr(plugin, "fsdp_version", 1) == 2
    if cfg.optim.name == "muon" and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED") and not fsdp2:
        raise TrainingError(
            f"optim.name: muon orthogonalizes whole weight matrices, but {accelerator.distributed_type.value} "
            "shards them into flat partitions (FSDP1, DeepSpeed); use optim.name=adamw with that launch, FSDP2 "
            "(fsdp_version: 2, configs/accelerate/fsdp.yaml) or DDP (configs/accelerate/ddp.yaml)")


def _prepare_output_dir(cfg: TrainConfig, accelerator, out: Path, resume_from: Path | None, main: bool) -> None:
    """OUT and OUT/config.json; a fresh run starts its own log (and, with overwrite, drops old checkpoints)."""
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:  # a fresh run: its own log (and, with overwrite, no old checkpoints)
            if cfg.overwrite:
                for old in (out / "checkpoints", out / "best"):
                    shutil.rmtree(old, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()


def _data_loader(cfg: TrainConfig, train_set, processor, streamed: bool) -> DataLoader:
    collate = Collator(processor, train=True, augment=cfg.data.augment, itc_questions=cfg.objectives.itc_questions)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    # A data set that sets `ordered` (a curriculum over independent random items) is read in order.
    return DataLoader(
        train_set, batch_size=cfg.batch_size, generator=g, collate_fn=collate,
        shuffle=None if streamed else not getattr(train_set, "ordered", False),
        num_workers=cfg.data.num_workers, drop_last=True, persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=_worker_ignores_stop_signals,
    )


def _optimizer(cfg: TrainConfig, model, accelerator) -> torch.optim.Optimizer:
    if cfg.optim.name == "muon":
        from train.optim import MuonAdamW

        return MuonAdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                         eps=cfg.optim.eps, momentum=cfg.optim.muon_momentum)
    # torch's fused AdamW (one kernel over all tensors; the default is a per-tensor loop on CPU):
    # 3x faster steps on CPU. Left to FSDP / DeepSpeed, which shard the parameters, as they are.
    fused = accelerator.distributed_type.value not in ("FSDP", "DEEPSPEED") and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps, fused=fused or None)


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # bf16 on this kind of CPU is ~8x slower than fp32


def _reset_accelerator_state() -> None:
    """Accelerate keeps one precision / accumulation state per process and refuses a second run in the
    same process (a notebook, a sweep) that asks for another ("AcceleratorState has already been
    initialized"). Each run starts from its own config; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """Ctrl-C reaches the data workers too, and `accelerate launch` passes SIGTERM to each process group:
    the workers leave both to the main process, which stops after its step (they end with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --- the data and the model, also used alone -------------------------------------------------------------


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
            raise ConfigError(f"model.path {cfg.model.path!r}: not a model folder mmgpt can load ({first_line(err)}); give "
                              "the model folder of an earlier run (OUT/model)") from None
        except ValueError as err:  # e.g. a config of another model type
            raise ConfigError(f"model.path {cfg.model.path!r}: {first_line(err)}") from None
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
        first = first_line(err)
        raise ConfigError(
            f"model.preset {cfg.model.preset!r}: could not load its pretrained parts ({first}); without a "
            "reachable hub give local folders: model.overrides.vision_pretrained=DIR "
            "model.overrides.text_pretrained=DIR") from None


def first_line(err: BaseException) -> str:
    """The first line of an error's message (transformers' run to many), or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
