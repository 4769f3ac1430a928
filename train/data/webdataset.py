"""Streaming reader for WebDataset tar shards, with the standard library's ``tarfile``.

A shard is a tar whose members are grouped into samples by key (the member path up to the
first dot of its file name): ``{key}.jpg|jpeg|png|webp`` is the image, ``{key}.txt`` a
caption, ``{key}.json`` a caption (``caption``/``text``) or a question with
``answer``/``answers`` (plus optional ``image_id``, ``qtype``, ``references``).

Splitting: every (rank, DataLoader worker) pair reads a disjoint part. With at least as many
shards as readers, shards go round-robin (after a per-epoch shuffle shared by all ranks);
with fewer, every reader walks every shard and keeps every n-th sample. Either way each
sample is read by exactly one reader per epoch. Ranks may get unequal numbers of samples when
the shard count does not divide evenly: give each rank the same number of samples (or cap
steps per epoch) when training on several processes.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from train.data.bad import EMPTY_TEXT, BadRecord, DataError
from train.data.records import entry_to_record, make_entry, resolve_columns

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
BAD_JSON = "bad_json"  # a sample's .json does not parse
CORRUPT_SHARD = "corrupt_shard"  # the rest of a shard that cannot be read

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000..003}.tar`` -> four names; ``{a,b}`` -> two; nested and repeated braces too."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for opt in options for name in expand_braces(head + opt + tail)]


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard paths from a pattern or list: brace expansion, then glob (sorted) where it has
    wildcards. ``::`` separates several patterns in one string."""
    patterns = urls.split("::") if isinstance(urls, str) else list(urls)
    shards: list[str] = []
    for pattern in patterns:
        for name in expand_braces(str(pattern)):
            if any(c in name for c in "*?["):
                matched = sorted(glob.glob(name))
                if not matched:
                    raise DataError(f"no WebDataset shards match {name!r}")
                shards += matched
            else:
                shards.append(name)
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(shards)} WebDataset shards do not exist, first: {missing[0]}"
        )
    if not shards:
        raise DataError(f"no WebDataset shards in {urls!r}")
    return shards


def iter_tar_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` from a tar, grouping consecutive members by key."""
    key, parts = None, {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            k = f"{dirname}/{stem}" if dirname else stem
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            f = tar.extractfile(member)
            parts[ext.lower()] = f.read() if f is not None else b""
    if key is not None:
        yield key, parts


def sample_to_record(key: str, parts: dict[str, bytes], where: str) -> dict | BadRecord:
    """One WebDataset sample as a record (or a bad marker)."""
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if "json" in parts:
        try:
            row = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return BadRecord(BAD_JSON, where, str(e))
        if not isinstance(row, dict):
            return BadRecord(BAD_JSON, where, f"expected a JSON object, got {type(row).__name__}")
        mapping = {r: c for r, c in resolve_columns(row).items() if r != "image"}
        fields = {role: row.get(col) for role, col in mapping.items()}
        fields.setdefault("image_id", key)
        entry = make_entry(image, where, **fields)
    elif "txt" in parts:
        entry = make_entry(image, where, caption=parts["txt"].decode("utf-8", "replace"), image_id=key)
    else:
        return BadRecord(EMPTY_TEXT, where, f"no .txt or .json in sample (found {sorted(parts)})")
    return entry_to_record(entry)


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (as webdataset.shuffle does)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class WebDatasetSource(IterableDataset):
    """Streams records from tar shards; see the module docstring for how work is split.

    ``shuffle_buffer`` <= 1 keeps the order (shards in the given order, samples as stored).
    Call ``set_epoch(e)`` each epoch for a new shard order and shuffle.
    """

    def __init__(
        self,
        urls: str | list[str],
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.shards = expand_urls(urls)
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reader(self) -> tuple[int, int]:
        """``(index, count)`` of this (rank, worker) among all readers."""
        rank, world = _dist_rank_world(self.rank, self.world_size)
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nworkers + wid, world * nworkers

    def __iter__(self) -> Iterator[dict | BadRecord]:
        index, count = self.reader()
        shards = list(self.shards)
        shuffle = self.shuffle_buffer > 1
        if shuffle:
            random.Random(f"wds-shards-{self.seed}-{self.epoch}").shuffle(shards)  # same on every reader
        by_shard = len(shards) >= count
        mine = shards[index::count] if by_shard else shards

        def samples() -> Iterator[tuple[str, dict, str] | BadRecord]:
            n = 0
            for shard in mine:
                try:
                    for key, parts in iter_tar_samples(shard):
                        if by_shard or n % count == index:
                            yield key, parts, f"{shard}:{key}"
                        n += 1
                except (tarfile.TarError, OSError, EOFError) as e:
                    if by_shard or index == 0:  # counted once, not once per reader
                        yield BadRecord(CORRUPT_SHARD, shard, f"{type(e).__name__}: {e}")

        stream = samples()
        if shuffle:
            rng = random.Random(f"wds-samples-{self.seed}-{self.epoch}-{index}")
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        for item in stream:
            yield item if isinstance(item, BadRecord) else sample_to_record(*item)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, shuffle_buffer={self.shuffle_buffer})"
