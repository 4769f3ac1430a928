"""A saved model folder, found and checked before and after loading: each thing it lacks or holds wrong is
one `ModelLoadError` line naming the file and what to do (`mmgpt.api.VisionLanguagePipeline.from_pretrained`
runs these checks; training runs `check_model_folder` on `model.path`)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from mmgpt.model import MMGPTModel
from mmgpt.processor import PROCESSOR_FILE, MMGPTProcessor

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILE = "tokenizer.json"  # what MMGPTProcessor.from_pretrained reads (a fast tokenizer)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # its special tokens (end of text, padding)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"


class ModelLoadError(ValueError):
    """A model folder (or hub id) is missing or is not a usable mmgpt model; one readable line."""


def one_line(err: BaseException) -> str:
    """The first line of an error's message; a first line that only announces what follows (ends with ':',
    as huggingface_hub's "Validation error for field 'n_positions':") gets the next line too."""
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not text:
        return type(err).__name__
    head = f"{text[0]} {text[1]}" if text[0].endswith(":") and len(text) > 1 else text[0]
    return f"{type(err).__name__}: {head}"


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A local folder, or a hub id fetched (or found in the cache) with `huggingface_hub`."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{path}: is a file, not a model folder (expected the folder save_pretrained wrote)")
    spec = os.fspath(path)
    if not HUB_ID.fullmatch(spec):
        raise ModelLoadError(f"{path}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec))
    except Exception as err:  # noqa: BLE001 - any hub failure is one readable line
        raise ModelLoadError(
            f"{path}: no such model folder, and it could not be fetched from the Hugging Face Hub ({one_line(err)})"
        ) from None


def _json_object(path: Path, name: str, fix: str) -> dict:
    """A JSON file that must hold an object; ModelLoadError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{name}: {path.name} is unreadable ({one_line(err)}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{name}: {path.name} holds a JSON {type(data).__name__}, not an object of "
                             f"settings; {fix}")
    return data


def _check_processor_settings(settings: dict, name: str) -> None:
    """The image and text settings the processor is built from, checked at load (a bad image_size would
    otherwise fail at the first image, deep inside the resize)."""
    where = f"{name}: {PROCESSOR_FILE}:"

    def count(key: str) -> None:
        value = settings.get(key)
        if key in settings and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelLoadError(f"{where} {key} must be a whole number >= 1, got {value!r}")

    count("image_size")
    count("max_length")
    for key in ("image_mean", "image_std"):
        value = settings.get(key)
        if key not in settings:
            continue
        ok = isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (key == "image_std" and min(value) <= 0):
            need = "3 numbers > 0" if key == "image_std" else "3 finite numbers"
            raise ModelLoadError(f"{where} {key} must be {need} (one per colour channel), got {value!r}")
    templates = settings.get("templates")
    if templates is not None and not (isinstance(templates, dict) and all(isinstance(v, str) for v in templates.values())):
        raise ModelLoadError(f"{where} templates must map task names to prompt texts, got {templates!r}")


def check_model_folder(folder: Path, name: str) -> None:
    """Raise ModelLoadError naming what a model folder lacks or holds wrong, before transformers sees it:
    config.json (an mmgpt config), weights, and the processor's three files with settings it can use."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{name}: not an mmgpt model folder (no config.json)")
    model_type = _json_object(config, name, "save the model again with model.save_pretrained").get("model_type")
    if model_type != "mmgpt":
        raise ModelLoadError(f"{name}: config.json is for model type {model_type!r}, not an mmgpt model")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{name}: no weights (expected {WEIGHT_FILES[0]})")
    fix = "save the processor again with processor.save_pretrained"
    for fname in (PROCESSOR_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):  # all written by processor.save_pretrained
        if not (folder / fname).is_file():
            raise ModelLoadError(f"{name}: no {fname} (save the processor into the folder with "
                                 f"processor.save_pretrained)")
        settings = _json_object(folder / fname, name, fix)
        if fname == PROCESSOR_FILE:
            _check_processor_settings(settings, name)


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers (no tensor data); {} for other formats."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    shapes = {}
    for fname in files:
        if (folder / fname).is_file():
            with safe_open(folder / fname, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 - not a dict
    return shapes


def shape_mismatches(folder: Path) -> list[str]:
    """`name (saved S, config.json makes C)` for each saved tensor whose shape the config does not give;
    the model is built on the meta device (no memory), so a config that asks for a huge tensor is harmless."""
    from mmgpt.config import MMGPTConfig

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MMGPTModel(MMGPTConfig.from_pretrained(folder)).state_dict().items()}
    return [f"{k} (saved {list(shape)}, config.json makes {list(expected[k])})"
            for k, shape in _saved_shapes(folder).items() if k in expected and expected[k] != shape]


def check_loaded(model: MMGPTModel, processor: MMGPTProcessor, info: dict, path) -> None:
    """What transformers only warns about, or never looks at, as ModelLoadError: weights the config has
    no place for (missing, unused, other shapes), weights that are not finite, a tokenizer the model cannot use."""
    fix = "config.json does not describe the model these weights were saved from (was it edited?)"
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would warn and go on with random weights
        raise ModelLoadError(f"{path}: the weights do not fit the config: {len(missing)} tensors missing, "
                             f"e.g. {missing[0]}; {fix}")
    unused = sorted(info.get("unexpected_keys") or [])
    if unused:  # e.g. text.n_layer lowered: the saved layers past it would be dropped without a word
        raise ModelLoadError(f"{path}: the weights do not fit the config: {len(unused)} saved tensors are not "
                             f"used by it, e.g. {unused[0]}; {fix}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise ModelLoadError(f"{path}: the weights do not fit the config: {len(mismatched)} tensors have other "
                             f"shapes, e.g. {mismatched[0][0]}; {fix}")
    with torch.no_grad():
        bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelLoadError(f"{path}: the weights are not finite: {len(bad)} tensors hold NaN or infinity, e.g. "
                             f"{bad[0]} (the training run diverged, or the file is damaged); use an earlier checkpoint")
    tok = processor.tokenizer
    if tok.eos_token_id is None:
        raise ModelLoadError(f"{path}: the tokenizer has no end-of-text token ({TOKENIZER_CONFIG_FILE} names "
                             "none); save the processor again with processor.save_pretrained")
    vocab = model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ModelLoadError(f"{path}: the tokenizer has {len(tok)} tokens but the model's embedding only {vocab}; "
                             f"{TOKENIZER_FILE} belongs to another model")
