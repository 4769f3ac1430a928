"""Readers for image path + text tables: JSONL, CSV, and an imagefolder with metadata.

A row names an image (``file_name``, ``image``, ``image_path``, ``path`` or ``img``; relative
paths are relative to the table's folder) and holds either a caption (``caption`` / ``text``)
or a question with ``answer`` and/or ``answers`` (a JSON list; in CSV also a JSON list string
or ``|``-separated). Optional: ``image_id``, ``qtype``. ``columns`` maps roles to other
column names, e.g. ``{"caption": "description"}``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train.data.bad import DataError
from train.data.records import (
    TEXT_ROLES,
    Entry,
    IndexedSource,
    attach_references,
    check_schema,
    entries_from_row,
    resolve_columns,
)


def _image_path(value: Any, root: Path) -> Any:
    if value is None or value == "":
        return None
    p = Path(str(value))
    return p if p.is_absolute() else root / p


def _open(path: Path, what: str, **kwargs):
    try:
        return open(path, encoding="utf-8", **kwargs)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} file ({e})") from e


def read_jsonl_entries(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Entry]:
    """Index a JSONL file: one JSON object per line (blank lines ignored)."""
    path = Path(path)
    root = path.parent
    entries: list[Entry] = []
    with _open(path, "JSONL") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            if not columns and ("conversations" in row or "messages" in row):  # a conversation
                from train.data.chat import chat_entry_from_row

                entries.append(chat_entry_from_row(row, where, root))
                continue
            mapping = resolve_columns(row, columns)
            if "image" not in mapping or not any(r in mapping for r in TEXT_ROLES):
                check_schema(where, row, {}, columns, noun="keys")  # raises, naming the keys found
            entries += entries_from_row(row, mapping, _image_path(row[mapping["image"]], root), where)
    if not entries:
        raise DataError(f"{path}: no records (empty JSONL file)")
    return entries


def _parse_answers(cell: Any, where: str) -> list[str] | None:
    """CSV answers cell: a JSON list string or ``|``-separated answers."""
    if cell is None or not str(cell).strip():
        return None
    cell = str(cell).strip()
    if cell.startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: answers cell is not a valid JSON list ({e}): {cell[:80]!r}") from e
        return [str(a) for a in value]
    return cell.split("|")


def read_csv_entries(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Entry]:
    """Index a CSV file with a header row."""
    path = Path(path)
    root = path.parent
    with _open(path, "CSV", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from e
        mapping = resolve_columns(header, columns)
        check_schema(str(path), header, mapping, columns)
        entries = []
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if "answers" in mapping:
                    row = dict(
                        row, **{mapping["answers"]: _parse_answers(row.get(mapping["answers"]), where)}
                    )
                entries += entries_from_row(row, mapping, _image_path(row.get(mapping["image"]), root), where)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not a readable CSV file ({e})") from e
    if not entries:
        raise DataError(f"{path}: no records (CSV file has a header but no rows)")
    return entries


# The split folder names `datasets` recognises (data_files.py's split keywords), by split.
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
METADATA = ("metadata.jsonl", "metadata.csv")


def _has_metadata(folder: Path) -> bool:
    return any((folder / n).is_file() for n in METADATA)


def split_folders(folder: str | Path) -> dict[str, Path]:
    """The split sub-folders of an imagefolder (``DIR/train/metadata.jsonl`` ...), by split name: a folder
    named as `datasets` names splits (``val`` -> validation) or any other sub-folder with metadata."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    alias = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and _has_metadata(p)):
        found.setdefault(alias.get(sub.name.lower(), sub.name), sub)
    return found


def metadata_file(folder: str | Path, split: str | None = None) -> Path:
    """The ``metadata.jsonl`` / ``metadata.csv`` of an imagefolder, or of its ``split`` sub-folder.

    As ``datasets.load_dataset("imagefolder", data_dir=DIR)`` reads it: metadata in ``DIR`` itself, or in
    split folders ``DIR/train/``, ``DIR/test/``, ``DIR/val/`` ...; without a split, ``train``."""
    folder = Path(folder)
    splits = split_folders(folder) if not _has_metadata(folder) or split else {}
    if split:
        names = {split, *SPLIT_FOLDERS.get(split, ())}
        sub = splits.get(split) or next((p for p in splits.values() if p.name in names), None)
        if sub is None and (folder / split).is_dir():
            sub = folder / split  # no metadata there: the error below names what it holds
        if sub is None and not splits and split == "train" and _has_metadata(folder):
            sub = folder  # a folder without split folders is all train, as for `datasets`
        if sub is None:
            have = ", ".join(splits) or "none"
            raise DataError(f"{folder}: no split folder {split!r} with metadata.jsonl or metadata.csv "
                            f"(split folders: {have})")
        folder = sub
    elif splits:
        if "train" not in splits:
            raise DataError(f"{folder}: split folders {', '.join(splits)} and no train split; name one, e.g. "
                            f"imagefolder:{folder}:{next(iter(splits))}")
        folder = splits["train"]
    found = [folder / n for n in METADATA if (folder / n).is_file()]
    if not found:
        raise DataError(
            f"{folder}: expected an imagefolder with metadata.jsonl or metadata.csv (or split folders "
            "train/, test/ ... holding them); "
            + (
                f"found {sorted(p.name for p in folder.iterdir())[:20]}"
                if folder.is_dir()
                else "no such folder"
            )
        )
    if len(found) > 1:
        raise DataError(f"{folder}: found both metadata.jsonl and metadata.csv; keep one")
    return found[0]


def read_table(
    path: str | Path, columns: Mapping[str, str] | None = None, limit: int | None = None
) -> IndexedSource:
    """A JSONL or CSV file (by extension) as a map-style source."""
    path = Path(path)
    read = read_csv_entries if path.suffix.lower() == ".csv" else read_jsonl_entries
    entries = read(path, columns)
    attach_references(entries)
    return IndexedSource(entries, str(path), limit)


def read_imagefolder(
    folder: str | Path,
    split: str | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> IndexedSource:
    """An imagefolder (images + ``metadata.jsonl`` or ``metadata.csv``) as a map-style source."""
    return read_table(metadata_file(folder, split), columns, limit)
