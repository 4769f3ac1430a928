"""One entry point for every data format: ``build_source(spec)`` and the command-line
short forms ``parse_source("coco:ann.json:images/")``.

A spec is a dict (from YAML or the command line) checked once into the typed
:class:`SourceSpec`; unknown keys are refused with the nearest valid key named::

    {"format": "jsonl", "path": "data/train.jsonl"}
    {"format": "csv", "path": "data/train.csv", "columns": {"caption": "description"}}
    {"format": "imagefolder", "path": "data/folder"}     # or data/folder/train/ ...: "split": "train"
    {"format": "coco", "annotations": "captions_train2014.json", "images": "train2014/"}
    {"format": "vqav2", "questions": "q.json", "annotations": "a.json", "images": "train2014/"}
    {"format": "hf", "name": "user/set" or "saved/folder", "split": "train", "columns": {...}}
    {"format": "webdataset", "urls": "shards/{000..003}.tar", "shuffle_buffer": 1000}
    {"format": "llava", "path": "llava_instruct.json", "images": "coco/train2017/"}
    {"format": "shapes", "split": "train", "size": 10000, "image_size": 64}
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

_LIMIT = ("limit",)
FORMAT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # format -> (required, optional)
    "jsonl": (("path",), ("columns",) + _LIMIT),
    "csv": (("path",), ("columns",) + _LIMIT),
    "imagefolder": (("path",), ("split", "columns") + _LIMIT),
    "coco": (("annotations", "images"), _LIMIT),
    "vqav2": (("questions", "annotations", "images"), ("split", "image_pattern") + _LIMIT),
    "hf": (("name",), ("split", "columns") + _LIMIT),
    "llava": (("path",), ("images",) + _LIMIT),
    "webdataset": (("urls",), ("shuffle_buffer", "seed", "rank", "world_size")),
    "shapes": ((), ("split", "size", "image_size", "task_mix", "seed", "grouped", "single_object_first",
                      "shape_pairs", "hard_negatives")),
}
FORMAT_ALIASES = {"wds": "webdataset", "huggingface": "hf", "json": "jsonl"}


def _nearest(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


@dataclass(frozen=True)
class SourceSpec:
    """A typed data source description; build one with :meth:`from_dict`, which checks keys."""

    format: str
    path: str | None = None  # jsonl, csv, imagefolder, llava
    name: str | None = None  # hf: hub name or save_to_disk folder
    split: str | None = (
        None  # hf (default train), shapes (default train), imagefolder sub-folder, vqav2 subtype
    )
    columns: dict[str, str] | None = None  # role -> column, roles: image caption question answer answers ...
    annotations: str | None = None  # coco, vqav2
    questions: str | None = None  # vqav2
    images: str | None = None  # coco, vqav2, llava: image folder (llava: default the JSON's folder)
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg"  # vqav2
    urls: str | list[str] | None = None  # webdataset
    shuffle_buffer: int = 1000  # webdataset
    seed: int = 0  # webdataset, shapes
    rank: int | None = None  # webdataset (default: torch.distributed or env RANK)
    world_size: int | None = None  # webdataset (default: torch.distributed or env WORLD_SIZE)
    size: int = 10000  # shapes: number of images
    image_size: int = 64  # shapes
    task_mix: dict[str, int] = field(default_factory=lambda: {"caption": 1, "vqa": 1})  # shapes
    grouped: bool = False  # shapes: one item per image, a list of its records
    single_object_first: int = 0  # shapes: curriculum, the first N images (read in order) hold one object
    shape_pairs: bool = False  # shapes: odd images = their predecessor with one object's shape changed
    hard_negatives: int = 0  # shapes: false captions (one shape / colour / size changed) per caption, for ITC
    limit: int | None = None  # map-style formats: keep the first `limit` records

    def __post_init__(self):
        fmt = FORMAT_ALIASES.get(self.format, self.format)
        if fmt not in FORMAT_KEYS:
            raise ValueError(
                f"unknown data format {self.format!r}{_nearest(str(self.format), FORMAT_KEYS)} "
                f"(formats: {', '.join(FORMAT_KEYS)})"
            )
        object.__setattr__(self, "format", fmt)
        for key in FORMAT_KEYS[fmt][0]:
            if getattr(self, key) in (None, ""):
                raise ValueError(f"data format {fmt!r} needs {key!r} (required: {list(FORMAT_KEYS[fmt][0])})")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                object.__setattr__(self, f.name, str(value))
            elif f.name in ("shuffle_buffer", "seed", "size", "image_size", "rank", "world_size", "limit"):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                    raise ValueError(f"data source key {f.name!r} must be an integer >= 0, got {value!r}")
            elif f.name in ("columns", "task_mix") and value is not None and not isinstance(value, dict):
                raise ValueError(f"data source key {f.name!r} must be a mapping, got {value!r}")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> SourceSpec:
        if "format" not in spec:
            raise ValueError(f"data source {spec!r} has no 'format' (formats: {', '.join(FORMAT_KEYS)})")
        fmt = FORMAT_ALIASES.get(spec["format"], spec["format"])
        if fmt not in FORMAT_KEYS:
            return cls(format=fmt)  # raises, naming the nearest format
        required, optional = FORMAT_KEYS[fmt]
        valid = ("format",) + required + optional
        all_keys = {f.name for f in fields(cls)}
        for key in spec:
            if key in valid:
                continue
            if key in all_keys:
                raise ValueError(
                    f"data source key {key!r} is not used by format {fmt!r}{_nearest(key, valid)} "
                    f"(valid keys: {', '.join(valid)})"
                )
            raise ValueError(
                f"unknown data source key {key!r}{_nearest(key, valid)} (valid keys for {fmt!r}: "
                f"{', '.join(valid)})"
            )
        return cls(**spec)


def build_source(spec: dict | SourceSpec | str) -> Dataset:
    """Build the dataset a spec describes (a dict, a :class:`SourceSpec`, or a short form)."""
    if isinstance(spec, str):
        spec = parse_source(spec)
    if isinstance(spec, dict):
        spec = SourceSpec.from_dict(spec)
    fmt = spec.format
    if fmt in ("jsonl", "csv"):
        from train.data.files import read_table

        return read_table(spec.path, spec.columns, spec.limit)
    if fmt == "imagefolder":
        from train.data.files import read_imagefolder

        return read_imagefolder(spec.path, spec.split, spec.columns, spec.limit)
    if fmt == "coco":
        from train.data.coco import read_coco

        return read_coco(spec.annotations, spec.images, spec.limit)
    if fmt == "vqav2":
        from train.data.coco import read_vqav2

        return read_vqav2(
            spec.questions, spec.annotations, spec.images, spec.split, spec.image_pattern, spec.limit
        )
    if fmt == "hf":
        from train.data.hf import hf_source

        return hf_source(spec.name, spec.split, spec.columns, spec.limit)
    if fmt == "llava":
        from train.data.chat import read_llava

        return read_llava(spec.path, spec.images, spec.limit)
    if fmt == "webdataset":
        from train.data.webdataset import WebDatasetSource

        return WebDatasetSource(spec.urls, spec.shuffle_buffer, spec.seed, spec.rank, spec.world_size)
    from train.data.shapes import ShapesDataset

    return ShapesDataset(
        spec.split or "train", spec.size, spec.image_size, spec.task_mix, spec.seed, spec.grouped,
        spec.single_object_first, spec.shape_pairs, spec.hard_negatives,
    )


SHORT_FORMS = (
    "shapes[:SPLIT[:SIZE[:IMAGE_SIZE]]]",
    "jsonl:PATH",
    "csv:PATH",
    "imagefolder:PATH[:SPLIT]",
    "coco:ANNOTATIONS.json:IMAGES_DIR",
    "vqav2:QUESTIONS.json:ANNOTATIONS.json:IMAGES_DIR",
    "hf:NAME_OR_DIR[:SPLIT]",
    "wds:URL_PATTERN",
    "llava:FILE.json[:IMAGES_DIR]",
    "PATH (.jsonl, .csv, .tar, an imagefolder or a save_to_disk folder)",
)


def _infer_format(path: str) -> dict:
    from train.data.hf import is_saved_dataset

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return {"format": "jsonl", "path": path}
    if suffix == ".csv":
        return {"format": "csv", "path": path}
    if suffix == ".tar" or path.endswith(".tar}") or ".tar" in p.name:
        return {"format": "webdataset", "urls": path}
    if p.is_dir():
        if is_saved_dataset(p):
            return {"format": "hf", "name": path}
        if any((p / m).is_file() for m in ("metadata.jsonl", "metadata.csv")):
            return {"format": "imagefolder", "path": path}
        from train.data.files import split_folders

        if split_folders(p):  # DIR/train/metadata.jsonl ...: read as `datasets` does, train by default
            return {"format": "imagefolder", "path": path}
    raise ValueError(f"cannot tell the data format of {path!r}; use one of: {'; '.join(SHORT_FORMS)}")


def parse_source(short: str) -> dict:
    """A command-line short form as a spec dict (see :data:`SHORT_FORMS`)."""
    head, _, rest = short.partition(":")
    fmt = FORMAT_ALIASES.get(head, head)
    if fmt not in FORMAT_KEYS:
        return _infer_format(short)
    parts = rest.split(":") if rest else []

    def need(n_min: int, n_max: int, usage: str) -> None:
        if not n_min <= len(parts) <= n_max or any(not p for p in parts):
            raise ValueError(f"bad data source {short!r}; expected {usage}")

    if fmt == "shapes":
        need(0, 3, SHORT_FORMS[0])
        spec: dict[str, Any] = {"format": "shapes"}
        for key, value in zip(("split", "size", "image_size"), parts):
            if key != "split" and not value.isdigit():
                raise ValueError(f"bad data source {short!r}: {key} must be an integer, got {value!r}")
            spec[key] = value if key == "split" else int(value)
        return spec
    if fmt in ("jsonl", "csv", "imagefolder"):
        if not rest:
            raise ValueError(f"bad data source {short!r}; expected {fmt}:PATH")
        path, _, split = rest.rpartition(":")
        if fmt == "imagefolder" and path and split and "/" not in split and not Path(rest).exists():
            return {"format": fmt, "path": path, "split": split}  # imagefolder:DIR:SPLIT
        return {"format": fmt, "path": rest}
    if fmt == "llava":
        need(1, 2, "llava:FILE.json[:IMAGES_DIR]")
        return {"format": "llava", "path": parts[0], **({"images": parts[1]} if len(parts) == 2 else {})}
    if fmt == "coco":
        need(2, 2, SHORT_FORMS[4])
        return {"format": "coco", "annotations": parts[0], "images": parts[1]}
    if fmt == "vqav2":
        need(3, 3, SHORT_FORMS[5])
        return {"format": "vqav2", "questions": parts[0], "annotations": parts[1], "images": parts[2]}
    if fmt == "hf":
        need(1, 2, SHORT_FORMS[6])
        return {"format": "hf", "name": parts[0], **({"split": parts[1]} if len(parts) == 2 else {})}
    if not rest:
        raise ValueError(f"bad data source {short!r}; expected {SHORT_FORMS[7]}")
    return {"format": "webdataset", "urls": rest}
