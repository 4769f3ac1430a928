"""Image-text retrieval: :func:`retrieval_metrics`.

Recall@K for image-to-text and text-to-image retrieval from an (images x texts) score matrix,
with several texts per image and, optionally, identical captions counted as equivalent.

Only the standard library and numpy are imported here (torch tensors are accepted without
importing torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["retrieval_metrics"]


def _to_numpy(sim: Any) -> np.ndarray:
    if hasattr(sim, "detach"):  # torch.Tensor, without importing torch
        sim = sim.detach()
        if sim.dtype.is_floating_point and sim.dtype.itemsize < 4:
            sim = sim.float()  # bfloat16 has no numpy equivalent
        sim = sim.cpu().numpy()
    arr = np.asarray(sim, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"similarity must be 2-D (num_images, num_texts), got shape {arr.shape}")
    # NaN scores rank last (as -inf); ties are broken by index below
    return np.where(np.isnan(arr), -np.inf, arr)


def _first_hit_ranks(scores: np.ndarray, relevant: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each row, the 0-based rank of its best relevant column under a stable descending
    sort (higher score first, equal scores by column index); -1 for rows with none."""
    rows, cols = scores.shape
    ranks = np.full(rows, -1, dtype=np.int64)
    idx = np.arange(cols)
    for lo in range(0, rows, chunk):
        s = scores[lo:lo + chunk]
        r = relevant[lo:lo + chunk]
        has = r.any(axis=1)
        # best relevant column: highest score, lowest index among equal scores
        masked = np.where(r, s, -np.inf)
        best_score = masked.max(axis=1, keepdims=True)
        best_col = np.argmax(r & (masked == best_score), axis=1)
        higher = (s > best_score).sum(axis=1)
        tied_before = ((s == best_score) & (idx[None, :] < best_col[:, None])).sum(axis=1)
        ranks[lo:lo + chunk] = np.where(has, higher + tied_before, -1)
    return ranks


def retrieval_metrics(
    sim: Any,
    text_to_image: Sequence[int] | None = None,
    image_to_texts: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    text_keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval.

    Args:
        sim: ``(num_images, num_texts)`` scores (torch tensor or array-like); higher = closer.
        text_to_image: image index of each text (``len == num_texts``).
        image_to_texts: text indices of each image (``len == num_images``). Either one, or both
            (their pairs are merged), describe the ground truth; with neither, ``sim`` must be
            square and text ``i`` belongs to image ``i``.
        ks: the K of Recall@K.
        text_keys: optional string per text (usually the caption). Texts with equal keys are
            interchangeable: for image->text a retrieved text is a hit when its key equals the
            key of one of the image's own texts, and for text->image an image is a hit when one
            of its texts has the query's key. Use it when captions repeat across images.

    Returns:
        ``retrieval_i2t_r{k}`` (fraction of images with a relevant text among their top k) and
        ``retrieval_t2i_r{k}`` (fraction of texts with a relevant image among their top k).
        Rankings are deterministic: a stable sort by descending score, so equal scores rank
        by index, and NaN scores rank last. Images without any text (and texts without an
        image) are left out of the averages.
    """
    scores = _to_numpy(sim)
    n_img, n_txt = scores.shape
    relevant = np.zeros((n_img, n_txt), dtype=bool)
    if text_to_image is None and image_to_texts is None:
        if n_img != n_txt:
            raise ValueError(f"similarity is {n_img}x{n_txt}: pass text_to_image or image_to_texts "
                             "when it is not square")
        np.fill_diagonal(relevant, True)
    if text_to_image is not None:
        t2i = np.asarray(text_to_image, dtype=np.int64).reshape(-1)
        if t2i.shape[0] != n_txt:
            raise ValueError(f"text_to_image has {t2i.shape[0]} entries for {n_txt} texts")
        if t2i.size and (t2i.min() < 0 or t2i.max() >= n_img):
            raise ValueError(f"text_to_image has an image index outside [0, {n_img})")
        relevant[t2i, np.arange(n_txt)] = True
    if image_to_texts is not None:
        if len(image_to_texts) != n_img:
            raise ValueError(f"image_to_texts has {len(image_to_texts)} entries for {n_img} images")
        for i, texts in enumerate(image_to_texts):
            for j in texts:
                if not 0 <= int(j) < n_txt:
                    raise ValueError(f"image_to_texts[{i}] has a text index outside [0, {n_txt})")
                relevant[i, int(j)] = True
    if text_keys is not None:
        if len(text_keys) != n_txt:
            raise ValueError(f"text_keys has {len(text_keys)} entries for {n_txt} texts")
        _, key_ids = np.unique(np.asarray([str(k) for k in text_keys], dtype=object), return_inverse=True)
        key_ids = key_ids.reshape(-1)
        # image i is relevant to text j when one of i's texts has j's key
        has_key = np.zeros((n_img, int(key_ids.max()) + 1 if n_txt else 0), dtype=bool)
        rows, cols = np.nonzero(relevant)
        has_key[rows, key_ids[cols]] = True
        relevant = has_key[:, key_ids]

    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    i2t = _first_hit_ranks(scores, relevant)
    t2i = _first_hit_ranks(scores.T, relevant.T)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        ranks = ranks[ranks >= 0]
        for k in ks:
            out[f"retrieval_{name}_r{k}"] = float((ranks < k).mean()) if ranks.size else 0.0
    return out
