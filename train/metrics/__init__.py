"""Evaluation metrics: see :mod:`train.metrics.caption` (moved from ``train/metrics.py``)."""

from train.metrics.caption import (
    CAPTION_METRICS,
    OFFICIAL_ANSWERS,
    MetricsWarning,
    caption_metrics,
    close_meteor,
    normalize_vqa_answer,
    retrieval_metrics,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "CAPTION_METRICS",
    "OFFICIAL_ANSWERS",
    "MetricsWarning",
    "caption_metrics",
    "close_meteor",
    "normalize_vqa_answer",
    "retrieval_metrics",
    "vqa_accuracy",
    "vqa_score",
]
