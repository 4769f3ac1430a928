"""Bad data: markers for records that cannot be used, a counter, and the schema error.

A record that cannot be used (missing or unreadable image, empty text) is not an exception:
``__getitem__`` returns a :class:`BadRecord` marker instead of the record, so skipping works
inside DataLoader worker processes. The collate step splits markers from records
(:func:`split_bad`, :class:`SkipBad`), the markers travel back to the main process with the
batch, and a :class:`BadDataCounter` there counts them by reason and stops the run with a
:class:`DataError` only when too many are bad.

A schema error (a file that cannot be parsed, missing columns or keys) is different: it is
raised as :class:`DataError` at once, when the source is built.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Reasons a record is skipped.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
CORRUPT_IMAGE = "corrupt_image"
NOT_AN_IMAGE = "not_an_image"
EMPTY_TEXT = "empty_text"
# Conversations (train.data.chat): the images and their places disagree, or nothing to learn from.
IMAGE_COUNT = "image_count"  # <image> placeholders (or image parts) and the images given differ in number
NO_ASSISTANT = "no_assistant_turn"
EMPTY_ASSISTANT = "empty_assistant_turn"
BAD_CONVERSATION = "bad_conversation"  # a turn of an unknown role, a message that is not a dict, ...
NO_IMAGE = "no_image"  # a conversation without images (text only): mmgpt trains conversations about images


class DataError(ValueError):
    """A data source is unusable: a schema error, or too many bad records."""


class DataWarning(UserWarning):
    """Something a reader noticed and went on with (keys of a record it does not use); said once."""


@dataclass(frozen=True)
class BadRecord:
    """Marker returned in place of a record that cannot be used.

    ``reason`` is one of the module constants (``missing_file``, ``empty_file``,
    ``corrupt_image``, ``not_an_image``, ``empty_text``); ``where`` names the record (file and line, shard and
    key, dataset row); ``detail`` is the underlying message.
    """

    reason: str
    where: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.reason}"
        return f"{text} ({self.detail})" if self.detail else text


def split_bad(items: Iterable[Any]) -> tuple[list[dict], list[BadRecord]]:
    """Split a batch into good records and bad markers.

    Items may be records, :class:`BadRecord` markers, ``None`` (counted as ``unknown``), or
    lists of these (per-image groups, see ``ShapesDataset(grouped=True)``), which are
    flattened in order.
    """
    good: list[dict] = []
    bad: list[BadRecord] = []
    stack = list(items)
    stack.reverse()
    while stack:
        item = stack.pop()
        if isinstance(item, BadRecord):
            bad.append(item)
        elif item is None:
            bad.append(BadRecord("unknown", "?", "dataset returned None"))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        else:
            good.append(item)
    return good, bad


class SkipBad:
    """Collate wrapper: ``SkipBad(collate_fn)(batch) -> (collate_fn(good) or None, bad)``.

    Runs inside the worker; the bad markers come back to the main process with the batch,
    where ``counter.add(bad)`` counts them. ``collate_fn`` sees a flat list of good records
    and is not called when there are none (the first element is then ``None``).
    """

    def __init__(self, collate_fn: Callable[[list[dict]], Any] | None = None):
        self.collate_fn = collate_fn

    def __call__(self, batch: list[Any]) -> tuple[Any, list[BadRecord]]:
        good, bad = split_bad(batch)
        if not good:
            return None, bad
        return (self.collate_fn(good) if self.collate_fn is not None else good), bad


class BadDataCounter:
    """Counts distinct bad records by reason and keeps the first few for the error message.

    A record is known by its reason and place (``where``): read again in the next epoch it is not
    counted again (``repeats`` counts those reads), so ``total`` is the number of distinct bad records,
    to judge against the number of distinct records seen. ``first`` holds the first ``keep`` of them.
    """

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.by_reason: Counter[str] = Counter()
        self.first: list[BadRecord] = []
        self.repeats = 0
        self._keys: set[tuple[str, str]] = set()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    @property
    def records(self) -> list[BadRecord]:
        """The kept records (``first``), as a list of dicts ``{"where", "reason", "detail"}``."""
        return [{"where": b.where, "reason": b.reason, "detail": b.detail} for b in self.first]

    def add(self, bad: BadRecord | Iterable[BadRecord]) -> None:
        for b in [bad] if isinstance(bad, BadRecord) else bad:
            key = (b.reason, b.where)
            if key in self._keys:
                self.repeats += 1
                continue
            self._keys.add(key)
            self.by_reason[b.reason] += 1
            self._keep(b)

    def _keep(self, b: BadRecord) -> None:
        """Add ``b`` to ``first`` unless it is full or already holds the same record."""
        if len(self.first) < self.keep and all((f.reason, f.where) != (b.reason, b.where) for f in self.first):
            self.first.append(b)

    def merge(self, other: BadDataCounter | dict) -> None:
        """Add another counter (or its ``to_dict()``, e.g. gathered from another rank): records both
        counted are counted once."""
        other = BadDataCounter.from_dict(other) if isinstance(other, dict) else other
        self.repeats += other.repeats
        for key in other._keys:
            if key in self._keys:
                self.repeats += 1
            else:
                self._keys.add(key)
                self.by_reason[key[0]] += 1
        # counted before records were known by place (an old checkpoint): add its counts as they are
        self.by_reason.update(other._unkeyed())
        for b in other.first:
            self._keep(b)

    def _unkeyed(self) -> Counter[str]:
        keyed = Counter(reason for reason, _ in self._keys)
        return Counter({r: n - keyed[r] for r, n in self.by_reason.items() if n > keyed[r]})

    def to_dict(self) -> dict:
        return {
            "by_reason": dict(self.by_reason),
            "first": [[b.reason, b.where, b.detail] for b in self.first],
            "keys": sorted([list(k) for k in self._keys]),
            "repeats": self.repeats,
        }

    @classmethod
    def from_dict(cls, d: dict, keep: int = 5) -> BadDataCounter:
        c = cls(keep=keep)
        c.by_reason.update(d.get("by_reason", {}))
        c._keys = {(str(r), str(w)) for r, w in d.get("keys", [])}
        c.repeats = int(d.get("repeats", 0))
        for b in d.get("first", []):
            c._keep(BadRecord(*b))
        return c

    def summary(self, total_seen: int | None = None) -> str:
        """``N bad records of M seen (x%) (reason: n, ...); first:`` and one line per kept record.
        ``total_seen`` is the number of distinct records read (good and bad)."""
        if not self.total:
            return "no bad records"
        reasons = ", ".join(f"{r}: {n}" for r, n in self.by_reason.most_common())
        head = f"{self.total} bad records"
        if total_seen:
            head += f" of {total_seen} seen ({self.total / total_seen:.1%})"
        if self.repeats:
            head += f", read {self.total + self.repeats} times over the epochs"
        lines = [f"{head} ({reasons}); first:"]
        lines += [f"  {b}" for b in self.first]
        return "\n".join(lines)

    def check(
        self, total_seen: int, max_bad_fraction: float = 0.01, min_seen: int = 100, final: bool = False
    ) -> None:
        """Raise :class:`DataError` if more than ``max_bad_fraction`` of the ``total_seen`` distinct
        records (good and bad together) were bad. Judged only once ``min_seen`` records were seen, or
        at the end (``final=True``: e.g. after a whole pass over the data)."""
        if total_seen <= 0 or (total_seen < min_seen and not final):
            return
        if self.total / total_seen > max_bad_fraction:
            raise DataError(
                f"too many bad records (more than data.max_bad_fraction={max_bad_fraction:g} of the records "
                "read): " + self.summary(total_seen) + "\nfix or remove the records named, or raise "
                "data.max_bad_fraction to train on the rest"
            )
