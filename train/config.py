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
    # several sources mixed with weights (open_clip's upsampling factors): [1, 2] or "1::2", one per source;
    # or a `weight:` key in each source (train.data.mix)
    train_weights: Any = None
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
    # torch.compile (inductor) of the training forward and backward, on CPU and GPU: the first steps wait
    # for the compiler (a minute or more); checkpoints, evaluation and export use the eager model
    compile: bool = False
    eval_every: int = 0  # steps; 0 = only at the end
    checkpoint_every: int = 0  # steps; 0 = no periodic checkpoints
    keep_checkpoints: int = 2
    # machines without a shared file system: each machine's first process writes OUT (checkpoints, the model,
    # metrics.jsonl) on its own disk; resume=latest then reads each machine's own copy
    save_on_each_node: bool = False
    best_metric: str | None = None  # e.g. "caption_exact_match": keep OUT/best
    output_dir: str = "runs/train"
    seed: int = 0
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # a fresh run into an output_dir with checkpoints: delete them (else refused)
    log_every: int = 10
    trackers: list = field(default_factory=list)  # e.g. ["tensorboard"]
    deterministic: bool = False
    progress: bool = True


def _nearest(key: str, valid, where: str = "") -> str:
    """The valid key the user most likely meant: one that starts with what was typed (`out` ->
    `output_dir`), else the closest spelling; nothing when no key is close. `where`: the section the
    key is in (`optim`), named in the suggestion (`'optim.lr'`)."""
    valid = sorted(valid)
    match = [v for v in valid if v.startswith(key)] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {(where + '.' if where else '') + match[0]!r}?" if match else ""


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_nearest(key, names, where)}")
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
    whole = int in args and float not in args
    if isinstance(value, str) and (float in args or int in args):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if isinstance(value, float) and whole:
        if not value.is_integer():
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and float in args and int not in args:
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if (int in args or float in args) and (isinstance(value, bool) or not isinstance(value, (int, float))) \
            and not (value is None and type(None) in args):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
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
            raise ConfigError(f"unknown config key {path!r}{_nearest(k, names, where)}")
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
    _check_values(cfg)
    _check_data(cfg.data)
    return cfg


# Metrics the in-training evaluation reports (higher is better), for `best_metric`; a per-type
# breakdown such as `caption_exact_match/3_objects` or `vqa_accuracy/color` is accepted too.
EVAL_METRICS = ("caption_exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "vqa_accuracy",
                *(f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)))
PRECISIONS = ("auto", "no", "bf16", "fp16", "fp8")


def usable_trackers(trackers) -> list:
    """The trackers (Accelerate's names, or "all") that can log here: each one's package is installed."""
    if not trackers:
        return []
    if "all" in trackers:
        return ["all"]
    import accelerate.utils as au

    return [t for t in trackers if getattr(au, f"is_{t}_available", lambda: False)()]


def _check_values(cfg: TrainConfig) -> None:
    """Ranges a typo or a sign slip can break, refused before any work starts."""
    o, d = cfg.optim, cfg.data

    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {what}, got {value!r}")

    for key in ("batch_size", "grad_accum", "max_steps", "log_every"):
        need(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be >= 1")
    for key in ("eval_every", "checkpoint_every"):
        need(getattr(cfg, key) >= 0, key, getattr(cfg, key), "must be >= 0 (0 = off)")
    need(cfg.keep_checkpoints >= 0, "keep_checkpoints", cfg.keep_checkpoints, "must be >= 0 (0 = keep all)")
    need(cfg.max_minutes is None or cfg.max_minutes > 0, "max_minutes", cfg.max_minutes, "must be > 0 (or null)")
    need(cfg.precision in PRECISIONS, "precision", cfg.precision, f"must be one of {', '.join(PRECISIONS)}")
    if o.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name: {o.name!r} is not an optimizer mmgpt knows; use 'adamw' or 'muon'")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(o.muon_lr is None or o.muon_lr > 0, "optim.muon_lr", o.muon_lr, "must be > 0 (or null: each part's lr)")
    for key in ("lr_vision", "lr_adapter", "lr_decoder"):
        v = getattr(o, key)
        need(v is None or v >= 0, f"optim.{key}", v, "must be >= 0 (0 = this part does not move; null = optim.lr)")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    if o.warmup_steps > cfg.max_steps:  # the learning rate would never reach optim.lr
        import warnings

        scaled = cfg.max_steps // 10
        warnings.warn(f"optim.warmup_steps={o.warmup_steps} is longer than the run (max_steps={cfg.max_steps}), so "
                      f"the learning rate would never reach optim.lr: this run warms up over {scaled} steps (a tenth "
                      "of max_steps) instead; set optim.warmup_steps up to max_steps to choose", stacklevel=3)
        o.warmup_steps = scaled
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = no clipping)")
    need(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    betas_ok = isinstance(o.betas, (list, tuple)) and len(o.betas) == 2
    need(betas_ok and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
         "optim.betas", o.betas, "must be two numbers in [0, 1)")
    need(0 <= o.muon_momentum < 1, "optim.muon_momentum", o.muon_momentum, "must be in [0, 1)")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    need(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")
    need(d.eval_images >= 1, "data.eval_images", d.eval_images, "must be >= 1")
    need(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1")
    need(cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "must be > 0 (the update is scaled by alpha / r)")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
    if cfg.freeze.feature_cache in (False, "no", "off", "false"):  # YAML reads `off` as false
        cfg.freeze.feature_cache = "none"
    need(cfg.freeze.feature_cache in ("memory", "none"), "freeze.feature_cache", cfg.freeze.feature_cache,
         "must be 'memory' or 'none' (off)")
    need(cfg.model.attn_implementation in ("sdpa", "eager"), "model.attn_implementation",
         cfg.model.attn_implementation, "must be 'sdpa' or 'eager' (what mmgpt's model runs)")
    if cfg.precision == "fp8":
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("transformer_engine", "msamp", "torchao")):
            raise ConfigError("precision: fp8 needs transformer_engine, MS-AMP or torchao installed (and a GPU "
                              "with fp8); use bf16")
    if isinstance(cfg.trackers, str):  # Accelerate's log_with takes one name too ("tensorboard", "all")
        cfg.trackers = [cfg.trackers]
    if cfg.trackers and "all" not in cfg.trackers:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for tracker in cfg.trackers:
            if str(tracker) not in LOGGER_TYPE_TO_CLASS:
                raise ConfigError(f"trackers: {tracker!r} is not a tracker Accelerate knows "
                                  f"({', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or all)")
        missing = [t for t in cfg.trackers if t not in usable_trackers(cfg.trackers)]
        if missing:
            import warnings

            rest = "only" if len(missing) == len(cfg.trackers) else "and the other trackers"
            warnings.warn(f"trackers: {', '.join(map(repr, missing))} not installed here (pip install "
                          f"{' '.join(missing)}); this run logs to OUT/metrics.jsonl {rest}", stacklevel=2)
    if cfg.best_metric is not None:
        base = cfg.best_metric.split("/")[0]
        if base not in EVAL_METRICS or (base != cfg.best_metric and base not in ("caption_exact_match", "vqa_accuracy")):
            raise ConfigError(f"best_metric: {cfg.best_metric!r} is not a metric the evaluation reports"
                              f"{_nearest(cfg.best_metric, EVAL_METRICS)} (metrics: {', '.join(EVAL_METRICS)})")
        if not d.validation:
            raise ConfigError("best_metric needs a validation source to score: set data.validation "
                              "(e.g. data.validation=shapes:validation:300)")


def _check_data(d: DataConfig) -> None:
    """Data sources as spec dicts, checked now: a command-line short form (`csv:data.csv`) becomes its
    dict, and a typo in a format or key is an error before the model is built."""
    from train.data.mix import parse_weights
    from train.data.sources import SourceSpec, parse_source

    def spec(value, where: str) -> dict:
        if not isinstance(value, (str, dict)):
            raise ConfigError(f"{where}: expected a source mapping or a short form such as shapes:train:1000, "
                              f"got {value!r}")
        try:
            if isinstance(value, str):
                value = parse_source(value)
            if "weight" in value and where.startswith("data.train"):  # a mixture weight, not a source key
                value = {**value, "weight": parse_weights(value["weight"], 1, "weight")[0]}
            SourceSpec.from_dict({k: v for k, v in value.items() if k != "weight"})
            if value.get("format") == "shapes":  # cheap to make: its split, task_mix, counts checked now
                from train.data import build_source

                build_source({k: v for k, v in value.items() if k != "weight"})
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not where.startswith("data.train") and value.get("size") == 0:
            raise ConfigError(f"{where}: size 0 gives nothing to evaluate; give a size >= 1, or no {where}")
        return value

    train = d.train if isinstance(d.train, list) else [d.train]
    if len(train) == 1 and isinstance(train[0], str) and "::" in train[0]:
        train = train[0].split("::")  # open_clip's a::b
    if not train:
        raise ConfigError("data.train: no training source given")
    d.train = [spec(v, f"data.train[{i}]") for i, v in enumerate(train)]
    if d.train_weights is not None:
        try:
            weights = parse_weights(d.train_weights, len(d.train))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        d.train = [{**s, "weight": w} for s, w in zip(d.train, weights)]
    for key in ("validation", "test"):
        value = getattr(d, key)
        if value is None:
            continue
        if isinstance(value, list):
            setattr(d, key, [spec(v, f"data.{key}[{i}]") for i, v in enumerate(value)])
        else:
            setattr(d, key, spec(value, f"data.{key}"))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
