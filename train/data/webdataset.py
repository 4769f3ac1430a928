"""Streaming reader for WebDataset tar shards, with the standard library's ``tarfile``.

A shard is a tar whose members are grouped into samples by key (the member path up to the
first dot of its file name): ``{key}.jpg|jpeg|png|webp`` is the image, ``{key}.txt`` a
caption, ``{key}.json`` a caption (``caption``/``text``) or a question with
``answer``/``answers`` (plus optional ``image_id``, ``qtype``, ``references``), and/or a list of
questions (``questions``: ``[{"question", "answer" or "answers"}, ...]``, or question strings with
``answers`` the parallel list), each a record of the sample's image; or a conversation
(LLaVA's ``conversations``, or ``messages``; several images as ``{key}.0.png``, ``{key}.1.png`` ...,
in name order; see ``train.data.chat``). Keys of the ``.json`` that the reader does not use are
said once (a ``DataWarning``).

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
import warnings
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from train.data.bad import EMPTY_TEXT, BadRecord, DataError, DataWarning
from train.data.records import (
    ROLES,
    entries_from_row,
    entry_to_record,
    make_entry,
    read_image,
    resolve_columns,
)

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


def _image_members(parts: dict[str, bytes]) -> list[bytes]:
    """The sample's images: ``jpg`` ... as before, else ``0.png``, ``1.png`` ... in name order."""
    plain = [parts[e] for e in IMAGE_EXTS if e in parts]
    if plain:
        return plain[:1]
    named = sorted(e for e in parts if e.rsplit(".", 1)[-1] in IMAGE_EXTS)
    return [parts[e] for e in named]


def sample_to_record(
    key: str, parts: dict[str, bytes], where: str, unused: set[str] | None = None
) -> dict | BadRecord | list:
    """One WebDataset sample as a record, a bad marker, or a list of them (the records of one image: a
    caption and its questions). Keys of the ``.json`` the reader does not use are added to ``unused``."""
    images = _image_members(parts)
    image = images[0] if images else None
    if "json" in parts:
        try:
            row = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return BadRecord(BAD_JSON, where, str(e))
        if not isinstance(row, dict):
            return BadRecord(BAD_JSON, where, f"expected a JSON object, got {type(row).__name__}")
        if "conversations" in row or "messages" in row:
            from train.data.chat import LLAVA_KEYS, chat_entry_from_row

            if unused is not None:
                unused |= set(row) - set(LLAVA_KEYS) - {"messages", "image_id"}
            return entry_to_record(chat_entry_from_row(row, where, images=images))
        mapping = {r: c for r, c in resolve_columns(row).items() if r != "image"}
        if unused is not None:
            unused |= set(row) - set(mapping.values()) - set(ROLES["image"])
        row = dict(row)
        if "image_id" not in mapping:
            mapping["image_id"], row["__key__"] = "__key__", key
        entries = entries_from_row(row, mapping, image, where)
    elif "txt" in parts:
        entries = [make_entry(image, where, caption=parts["txt"].decode("utf-8", "replace"), image_id=key)]
    else:
        return BadRecord(EMPTY_TEXT, where, f"no .txt or .json in sample (found {sorted(parts)})")
    if len(entries) == 1:
        return entry_to_record(entries[0])
    decoded = read_image(image, where)  # once for all the records of the sample
    if isinstance(decoded, BadRecord):
        return decoded
    return [entry_to_record(e, decoded) for e in entries]


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
        unused: set[str] = set()
        told = False
        for item in stream:
            if isinstance(item, BadRecord):
                yield item
                continue
            yield sample_to_record(*item, unused=unused)
            if unused and not told:  # once per reader
                told = True
                warnings.warn(f"WebDataset {item[2]}: keys {sorted(unused)} of the sample's .json are not read "
                              "(read: caption/text, question with answer/answers, questions, conversations or "
                              "messages, image_id, qtype, references)", DataWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, shuffle_buffer={self.shuffle_buffer})"
