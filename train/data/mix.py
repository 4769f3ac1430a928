"""Several training sources mixed with weights (open_clip's `a::b` with upsampling factors).

``data.train: "shapes:train:1000::wds:shards/{0..9}.tar"`` with ``data.train_weights: "1::2"`` (or a
``weight:`` key in each source mapping) reads the second source twice as often as its size alone
would make it.

- All sources map-style (sizes known): :class:`Upsampled`, one map-style set in which source ``i``
  of ``n_i`` records takes ``round(w_i * n_i)`` places (its records repeated for a weight above 1,
  evenly spaced ones for a weight below 1). The loader's seeded shuffle and Accelerate's skip of
  the batches already trained resume it exactly, as any map-style set.
- A streamed source among them: :class:`MixedStream`, an iterable set that draws each record's
  source at random with probability ``w_i / sum(w)`` (a seeded generator, the same on every
  process), map-style sources read through seeded permutations (a new one each pass), streams read
  in their own order. An epoch ends when every stream has been read through once (a stream that
  ends earlier starts again: HF datasets' ``interleave_datasets(stopping_strategy="all_exhausted")``).
  Everything it yields depends on (seed, epoch) only, so a resumed run that skips the batches it
  already trained reads on exactly where the stopped run was.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def parse_weights(value, n_sources: int, where: str = "data.train_weights") -> list[float]:
    """`[1, 2]`, `"1::2"` or a single number -> one positive weight per source; ValueError naming ``where``."""
    if isinstance(value, str):
        value = value.split("::")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        weights = [float(w) for w in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected numbers such as [1, 2] or '1::2', got {value!r}") from None
    if len(weights) != n_sources:
        raise ValueError(f"{where}: {len(weights)} weights for {n_sources} sources; give one per source")
    if any(not w > 0 for w in weights):
        raise ValueError(f"{where}: weights must be > 0, got {weights}")
    return weights


class Upsampled(Dataset):
    """Map-style sources, source ``i`` taking ``round(w_i * len_i)`` (at least 1) places."""

    def __init__(self, sets: Sequence[Dataset], weights: Sequence[float]):
        self.sets, self.weights = list(sets), list(weights)
        self.sizes = [len(s) for s in self.sets]
        self.counts = [max(1, round(w * n)) if n else 0 for w, n in zip(self.weights, self.sizes)]
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = bisect.bisect_right(self.starts, index) - 1
        k, n, c = index - self.starts[i], self.sizes[i], self.counts[i]
        return self.sets[i][k % n if c >= n else k * n // c]  # repeated, or evenly spaced


class MixedStream(IterableDataset):
    """Streamed and map-style sources drawn at random in proportion to their weights (see the module)."""

    def __init__(self, sets: Sequence, weights: Sequence[float], seed: int = 0):
        self.sets, self.weights, self.seed = list(sets), list(weights), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.sets:
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def _map_items(self, i: int, wid: int, nworkers: int) -> Iterator:
        """Source ``i`` (map-style) for ever: one seeded permutation per pass (this worker's part of it)."""
        data, rnd = self.sets[i], 0
        while True:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i, rnd)) & 0x7FFFFFFF)
            for j in torch.randperm(len(data), generator=g)[wid::nworkers].tolist():
                yield data[j]
            rnd += 1

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"mix-{self.seed}-{self.epoch}-{wid}")  # the same on every process
        streamed = [i for i, s in enumerate(self.sets) if isinstance(s, IterableDataset)]
        its = {i: iter(s) if i in streamed else self._map_items(i, wid, nworkers) for i, s in enumerate(self.sets)}
        ended: set[int] = set()  # streams read through once this epoch
        choices = range(len(self.sets))
        while True:
            i = rng.choices(choices, weights=self.weights)[0]
            try:
                yield next(its[i])
            except StopIteration:  # a stream ended: the epoch ends with the last one, the others start again
                ended.add(i)
                if len(ended) == len(streamed):
                    return
                its[i] = iter(self.sets[i])
                item = next(its[i], None)
                if item is None:  # an empty stream
                    return
                yield item
