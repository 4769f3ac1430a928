"""The data layer: every format read into one record type, the shapes world, bad-data accounting.

``build_source(spec)`` builds any source; see ``train.data.sources`` for the spec keys and
``train.data.records`` for the record every source yields. This package imports neither
``accelerate`` nor ``mmgpt``; ``datasets`` is imported only when a Hugging Face source is built.
"""

from train.data.bad import BadDataCounter, BadRecord, DataError, DataWarning, SkipBad, split_bad
from train.data.export import write_shapes_imagefolder
from train.data.records import Entry, IndexedSource, make_entry
from train.data.shapes import (
    ShapeObject,
    ShapesDataset,
    ShapesScene,
    caption,
    questions,
    render,
    sample_scene,
    scene_seed,
)
from train.data.sources import SourceSpec, build_source, parse_source

__all__ = [
    "BadDataCounter",
    "BadRecord",
    "DataError",
    "DataWarning",
    "Entry",
    "IndexedSource",
    "ShapeObject",
    "ShapesDataset",
    "ShapesScene",
    "SkipBad",
    "SourceSpec",
    "build_source",
    "caption",
    "make_entry",
    "parse_source",
    "questions",
    "render",
    "sample_scene",
    "scene_seed",
    "split_bad",
    "write_shapes_imagefolder",
]
