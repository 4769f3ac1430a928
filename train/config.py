"""Training configuration: YAML + `key.sub=value` overrides become typed dataclasses, once, here."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config mistake the user can fix; the message names the key."""


@dataclass
class ModelConfig:
    preset: str = "tiny"  # configs/model/NAME.json, or a path to such a JSON
    path: str | None = None  # an mmgpt model folder to continue from (overrides preset)
    overrides: dict = field(default_factory=dict)  # MMGPTConfig fields, e.g. {"unimodal_layers": 1}
    attn_implementation: str = "sdpa"
    tokenizer_texts: int = 20000  # records read to train the BPE of a config-built decoder


@dataclass
class DataConfig:
    train: list = field(default_factory=lambda: [{"format": "shapes", "split": "train", "size": 20000}])
    validation: dict | None = None
    test: dict | None = None
    num_workers: int = 2
    augment: bool = False  # random-resized crop on training images
    max_bad_fraction: float = 0.01
    eval_images: int = 200  # images of the validation source used for in-training evaluation


@dataclass
class ObjectivesConfig:
    itc_weight: float = 1.0
    lm_weight: float = 1.0
    # ramp the contrastive weight linearly from 0 over the first N optimizer steps: the shared decoder
    # (the text tower) changes fastest then, and contrastive steps against its moving target are noise
    itc_warmup_steps: int = 0
    # question+answer texts join the contrastive loss as well as captions ("what shape is the blue
    # object? square" is true of its image and of images with the same text)
    itc_questions: bool = False
    # bag-of-words loss on the caption rows (see MMGPTConfig.bow_weight); 0 = off
    bow_weight: float = 0.0
    label_smoothing: float = 0.0
    itc_duplicate_positives: bool = True  # identical captions are positives of each other


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon on hidden weight matrices, AdamW on the rest: train/optim.py)
    lr: float = 1e-3
    muon_lr: float | None = None  # all Muon matrices, every part; None = each part's lr (updates are AdamW-RMS-matched)
    muon_momentum: float = 0.95
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    lr_vision: float | None = None  # per-part learning rates; None = lr
    lr_adapter: float | None = None
    lr_decoder: float | None = None


@dataclass
class FreezeConfig:
    vision: bool = False
    decoder: bool = False
    # With the vision tower frozen and no augmentation, keep its outputs per image id in memory so
    # later epochs skip the encoder ("none" turns it off).
    feature_cache: str = "memory"
    feature_cache_gb: float = 4.0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["c_attn", "c_proj", "q_attn"])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    batch_size: int = 64  # images per process per step (each brings its caption and questions)
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock guard: stop (and export) when reached
    # With max_minutes: the cosine follows max(step / max_steps, elapsed / max_minutes), so the
    # schedule ends when the time budget does, on any machine (runs are then not bit-reproducible).
    time_schedule: bool = False
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16; or no | bf16 | fp16
    activation_checkpointing: bool = False
    eval_every: int = 0  # steps; 0 = only at the end
    checkpoint_every: int = 0  # steps; 0 = no periodic checkpoints
    keep_checkpoints: int = 2
    best_metric: str | None = None  # e.g. "caption_exact_match": keep OUT/best
    output_dir: str = "runs/train"
    seed: int = 0
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 10
    trackers: list = field(default_factory=list)  # e.g. ["tensorboard"]
    deterministic: bool = False
    progress: bool = True


def _nearest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_nearest(key, names)}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value or {}, path)
        else:
            kwargs[key] = _coerce(value, sub, path)
    obj = cls(**kwargs)
    if isinstance(obj.__dict__.get("betas"), list):
        obj.betas = tuple(obj.betas)
    return obj


def _coerce(value: Any, annotation, path: str) -> Any:
    """YAML reads `4e-3` as a string (it wants `4.0e-3`); numbers are numbers wherever a field says so."""
    args = set(getattr(annotation, "__args__", ())) or {annotation}
    if isinstance(value, bool) and str in args and bool not in args:
        # YAML 1.1 reads a bare no / yes / off / on as a bool: `precision: no` means the string
        return "no" if value is False else "yes"
    if isinstance(value, str) and (float in args or int in args):
        try:
            return int(value) if int in args and float not in args else float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and float in args and int not in args:
        return float(value)
    return value


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _check_override_path(dotted: str) -> None:
    cls, where = TrainConfig, ""
    for k in dotted.split("."):
        if cls is None:
            return  # inside a free-form dict (e.g. model.overrides.*)
        names = {f.name for f in dataclasses.fields(cls)}
        path = f"{where}.{k}" if where else k
        if k not in names:
            raise ConfigError(f"unknown config key {path!r}{_nearest(k, names)}")
        sub = get_type_hints(cls)[k]
        cls, where = (sub if dataclasses.is_dataclass(sub) else None), path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> TrainConfig."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err})") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _check_override_path(key.strip())
        _set(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    cfg = _build(TrainConfig, tree, "")
    if cfg.optim.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name: {cfg.optim.name!r} is not an optimizer mmgpt knows; use 'adamw' or 'muon'")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
