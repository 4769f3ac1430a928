"""The built-in ``shapes`` world (DESIGN.md, "The built-in world: shapes").

A procedural image-text data set that needs no download: a light canvas with 1-3 coloured
circles, squares and triangles, a canonical caption listing them left to right, and short
questions asked only where the answer is unique. Seeded and deterministic; the train,
validation and test splits use disjoint seeds.

- :mod:`train.data.shapes.world` — the world: scenes, drawing, captions, questions,
  conversations and two-image questions (every name in its ``__all__`` is re-exported here).
- :mod:`train.data.shapes.dataset` — :class:`ShapesDataset`: records of each task kind per
  image (``task_mix``), the curriculum and shape-pair options.
"""

from train.data.shapes import world
from train.data.shapes.dataset import TASK_KINDS, ShapesDataset, chat_record
from train.data.shapes.world import *  # the world's public names, listed in world.__all__

__all__ = ["TASK_KINDS", "ShapesDataset", "chat_record"]
__all__ += world.__all__
