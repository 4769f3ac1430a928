"""Reader for Hugging Face datasets: a hub name or a ``save_to_disk`` folder, with a column mapping.

The text columns are read once at construction; the image column is read row by row in
``__getitem__`` and decoded by ``encoders.image_io.load_image`` (an ``Image`` feature is cast
to ``decode=False`` first so a corrupt image becomes a counted bad record, not a crash). The
image column may hold PIL images, ``{"bytes", "path"}`` dicts, raw bytes, or paths (relative
paths are tried against the dataset folder).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train.data.bad import DataError
from train.data.records import (
    IndexedSource,
    attach_references,
    check_schema,
    entries_from_row,
    entry_to_record,
    image_source,
    resolve_columns,
)

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_saved_dataset(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS)


def load_hf(name: str, split: str | None = None):
    """``datasets.load_from_disk`` for a saved folder (picking ``split`` of a DatasetDict, default
    train), else ``datasets.load_dataset(name, split=split or "train")``.

    A saved single ``Dataset`` has no splits: asking for one is an error (it would silently read
    all rows), unless it is the split the dataset recorded, or "train" when it recorded none.
    """
    import datasets  # lazily: importing train.data must stay cheap

    if is_saved_dataset(name):
        ds = datasets.load_from_disk(str(name))
        if isinstance(ds, datasets.DatasetDict):
            split = split or "train"
            if split not in ds:
                raise DataError(f"{name}: no split {split!r} in the saved dataset; splits: {list(ds)}")
            return ds[split]
        own = str(ds.split) if ds.split is not None else None
        if split is not None and split != (own or "train"):
            recorded = f" (its recorded split is {own!r})" if own else ""
            raise DataError(
                f"{name}: the folder holds one Dataset without splits{recorded}, so split {split!r} "
                f"cannot be picked; drop the split (hf:{name}) to use all its rows"
            )
        return ds
    try:
        return datasets.load_dataset(name, split=split or "train")
    except (OSError, ValueError) as e:  # not found, offline, bad split
        raise DataError(f"cannot load Hugging Face dataset {name!r} split {split or 'train'!r}: {e}") from e


def hf_source(name: str, split: str | None = None, columns: Mapping[str, str] | None = None, limit=None):
    """A Hugging Face dataset as a source: conversations when it has a ``messages`` (TRL's layout, with
    ``images``) or ``conversations`` (LLaVA's, with ``image``) column and no column mapping, else
    captions / questions (:class:`HFSource`)."""
    ds = load_hf(name, split)
    if not columns and any(c in ds.column_names for c in ("messages", "conversations")):
        return HFChatSource(name, split, limit, ds=ds)
    return HFSource(name, split, columns, limit, ds=ds)


def _undecoded(ds, column: str):
    """``ds`` with ``column``'s images (an Image feature, or a list of them) cast to decode=False, so a
    corrupt image becomes a counted bad record when read, not a crash."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):  # List(Image()) / Sequence(Image())
        return ds.cast_column(column, type(feature)(datasets.Image(decode=False)))
    return ds


def _resolve(ref: Any, root: Path | None) -> Any:
    """An image cell as a reference ``read_image`` takes; a relative path is tried against ``root``."""
    if isinstance(ref, dict) and not ref.get("bytes"):
        ref = ref.get("path")
    relative = isinstance(ref, str) and root is not None and not Path(ref).is_absolute()
    if relative and not Path(ref).exists() and (root / ref).exists():
        ref = str(root / ref)
    return ref


def _image_counts(ds, column: str) -> list[int]:
    """The number of images in each row's cell (a list of images, or one image or null), from the Arrow
    column without reading the images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[column]  # pyarrow (Chunked)Array
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return [n or 0 for n in pc.list_value_length(col).to_pylist()]
    return [int(v) for v in pc.is_valid(col).to_pylist()]


class HFChatSource(IndexedSource):
    """Conversations of a Hugging Face dataset: ``messages`` + ``images`` (TRL), or ``conversations`` +
    ``image``/``images`` (LLaVA's layout on the hub). The messages are read at construction, the images
    row by row (see ``train.data.chat``)."""

    def __init__(self, name: str, split: str | None = None, limit=None, ds=None):
        from train.data.chat import chat_entry_from_row

        ds = load_hf(name, split) if ds is None else ds
        where = f"{name} [{split or ds.split or 'train'}]"
        text_col = "messages" if "messages" in ds.column_names else "conversations"
        image_col = next((c for c in ("images", "image") if c in ds.column_names), None)
        n = len(ds) if limit is None else min(limit, len(ds))
        head = ds.select(range(n)) if n < len(ds) else ds
        keep = [c for c in (text_col, "id", "image_id") if c in ds.column_names]
        table = head.select_columns(keep).to_dict()
        self.images = _undecoded(ds, image_col).select_columns([image_col]) if image_col else None
        self.image_col = image_col
        self.root = Path(name) if Path(name).is_dir() else None
        counts = _image_counts(head, image_col) if image_col else [0] * n
        entries = []
        for i in range(n):
            row = {c: table[c][i] for c in keep}
            refs = [None] * counts[i]  # placeholders now; the images are read in __getitem__
            entries.append(chat_entry_from_row(row, f"{where} row {i}", images=refs))
        super().__init__(entries, where, limit)

    def _refs(self, i: int) -> list:
        if self.images is None:
            return []
        cell = self.images[i][self.image_col]
        cells = cell if isinstance(cell, (list, tuple)) else ([] if cell is None else [cell])
        return [_resolve(c, self.root) for c in cells]

    def __getitem__(self, i: int):
        e = self.entries[i]
        if e.bad is not None or not e.images:
            return entry_to_record(e)
        return entry_to_record(e, self._refs(i))


class HFSource(IndexedSource):
    """Map-style source over a Hugging Face ``Dataset``."""

    def __init__(self, name: str, split: str | None = None, columns: Mapping[str, str] | None = None, limit=None,
                 ds=None):
        import datasets

        ds = load_hf(name, split) if ds is None else ds
        where = f"{name} [{split or ds.split or 'train'}]"
        mapping = resolve_columns(ds.column_names, columns)
        check_schema(where, ds.column_names, mapping, columns)
        image_col = mapping["image"]
        if isinstance(ds.features.get(image_col), datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
        n = len(ds) if limit is None else min(limit, len(ds))  # rows; entries are cut to `limit` too
        text_cols = sorted({c for r, c in mapping.items() if r != "image"})
        head = ds.select(range(n)) if n < len(ds) else ds
        table = head.select_columns(text_cols).to_dict()
        entries, rows = [], []  # rows[k]: the dataset row of entry k (a row of captions gives several)
        for i in range(n):
            row_entries = entries_from_row(
                {c: table[c][i] for c in text_cols}, mapping, None, f"{where} row {i}"
            )
            entries += row_entries
            rows += [i] * len(row_entries)
        attach_references(entries)
        super().__init__(entries, where, limit)
        self.rows = rows
        self.root = Path(name) if Path(name).is_dir() else None
        self.images = ds.select_columns([image_col])
        self.image_col = image_col

    def _image_ref(self, i: int) -> Any:
        return _resolve(self.images[i][self.image_col], self.root)

    def __getitem__(self, i: int):
        row = self.rows[i]
        ref = self._image_ref(row)
        # An image stored in the dataset has no path: the row names it (a row of captions is one image).
        return entry_to_record(self.entries[i], ref, image_source(ref) or f"{self.name} row {row}")
