"""Recall@K of text-to-image search: the fraction of queries with a right image among the first K."""

from __future__ import annotations

from collections.abc import Sequence


def recall_at(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], ks: Sequence[int] = (1, 10)) -> dict:
    """``ranked[q]``: the paths search returned for query q, best first; ``relevant[q]``: the paths that
    answer it (several where captions repeat). -> ``{"t2i_r1": ..., "t2i_r10": ...}``."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} queries")
    n = max(len(ranked), 1)
    return {f"t2i_r{k}": sum(bool(set(r[:k]) & rel) for r, rel in zip(ranked, relevant)) / n for k in ks}
