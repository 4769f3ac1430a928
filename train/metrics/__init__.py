"""Evaluation metrics, one module per family.

- :mod:`train.metrics.caption` — :func:`caption_metrics`: COCO BLEU-1..4, METEOR, ROUGE-L and
  CIDEr-D by ``pycocoevalcap``'s own scorers on COCO-tokenized text
  (:mod:`train.metrics._coco_tokenize`, the PTBTokenizer jar or its pure-Python copy), with
  METEOR's Java process guarded in :mod:`train.metrics.meteor` (:func:`close_meteor`).
- :mod:`train.metrics.vqa` — :func:`normalize_vqa_answer`, :func:`vqa_accuracy`,
  :func:`vqa_score`: the official VQAv2 rules.
- :mod:`train.metrics.retrieval` — :func:`retrieval_metrics`: image-to-text and text-to-image
  Recall@K from a score matrix.

Only the standard library and numpy are imported (torch tensors are read without importing
torch); pycocoevalcap is imported lazily by :func:`caption_metrics`.
"""

from train.metrics.caption import CAPTION_METRICS, MetricsWarning, caption_metrics
from train.metrics.meteor import MeteorError, close_meteor
from train.metrics.retrieval import retrieval_metrics
from train.metrics.vqa import OFFICIAL_ANSWERS, normalize_vqa_answer, vqa_accuracy, vqa_score

__all__ = [
    "CAPTION_METRICS",
    "OFFICIAL_ANSWERS",
    "MeteorError",
    "MetricsWarning",
    "caption_metrics",
    "close_meteor",
    "normalize_vqa_answer",
    "retrieval_metrics",
    "vqa_accuracy",
    "vqa_score",
]
