"""Readers for COCO captions and VQAv2 (questions + annotations JSON over COCO images)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from train.data.bad import DataError
from train.data.records import Entry, IndexedSource, make_entry


def load_json(path: str | Path, keys: tuple[str, ...], what: str) -> dict:
    """Load a JSON object and check it has ``keys``; :class:`DataError` naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} JSON ({type(e).__name__}: {e})") from e
    found = sorted(data) if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise DataError(f"{path}: expected {what} JSON with keys {list(keys)}; found keys {found}")
    return data


def _items(data: dict, key: str, fields: tuple[str, ...], path: Path, what: str) -> list[dict]:
    """``data[key]`` as a list of dicts that all have ``fields``."""
    items = data[key]
    if not isinstance(items, list):
        raise DataError(f"{path}: expected {what} '{key}' to be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(f not in item for f in fields):
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(f"{path}: {key}[{i}]: expected keys {list(fields)}; found keys {found}")
    return items


def read_coco(annotations: str | Path, images: str | Path, limit: int | None = None) -> IndexedSource:
    """COCO captions: ``images`` (id, file_name) and ``annotations`` (image_id, caption).

    Each caption is a record; ``references`` holds all captions of its image.
    """
    path, images = Path(annotations), Path(images)
    data = load_json(path, ("images", "annotations"), "COCO captions")
    files = {im["id"]: im["file_name"] for im in _items(data, "images", ("id", "file_name"), path, "COCO")}
    anns = _items(data, "annotations", ("image_id", "caption"), path, "COCO")
    refs: dict[Any, list[str]] = defaultdict(list)
    for a in anns:
        caption = str(a["caption"] or "").strip()
        if caption:
            refs[a["image_id"]].append(caption)
    entries: list[Entry] = []
    for i, a in enumerate(anns):
        iid = a["image_id"]
        where = f"{path} annotation {a.get('id', i)} (image_id {iid})"
        image = images / files[iid] if iid in files else None
        entries.append(make_entry(image, where, caption=a["caption"], image_id=iid, references=refs[iid]))
    return IndexedSource(entries, str(path), limit)


def read_vqav2(
    questions: str | Path,
    annotations: str | Path,
    images: str | Path,
    split: str | None = None,
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg",
    limit: int | None = None,
) -> IndexedSource:
    """VQAv2: questions JSON + annotations JSON + a COCO image folder.

    The image of question ``q`` is ``images / image_pattern.format(subtype=..., image_id=...)``
    where ``subtype`` (e.g. ``train2014``) is ``split`` when given (``"val"`` becomes
    ``"val2014"``), else the JSON's ``data_subtype``. ``target`` is ``multiple_choice_answer``,
    ``answers`` all ten human answers (duplicates kept, as VQA accuracy counts them).
    """
    qpath, apath, images = Path(questions), Path(annotations), Path(images)
    qdata = load_json(qpath, ("questions",), "VQAv2 questions")
    adata = load_json(apath, ("annotations",), "VQAv2 annotations")
    qs = _items(qdata, "questions", ("image_id", "question", "question_id"), qpath, "VQAv2 questions")
    anns = _items(adata, "annotations", ("question_id", "answers"), apath, "VQAv2 annotations")
    subtype = split or qdata.get("data_subtype") or adata.get("data_subtype")
    if "{subtype}" in image_pattern and not subtype:
        raise DataError(f"{qpath}: no 'data_subtype' in the JSON; give the split (e.g. 'train2014')")
    if subtype and not subtype[-1].isdigit():
        subtype += "2014"
    by_qid = {a["question_id"]: a for a in anns}
    missing = [q["question_id"] for q in qs if q["question_id"] not in by_qid]
    if missing:
        raise DataError(
            f"{apath}: no annotation for {len(missing)} of the {len(qs)} questions in {qpath} "
            f"(first question_id {missing[0]})"
        )
    entries = []
    for q in qs:
        a = by_qid[q["question_id"]]
        answers = [x["answer"] if isinstance(x, dict) else x for x in a["answers"]]
        image = images / image_pattern.format(subtype=subtype, image_id=q["image_id"])
        where = f"{qpath} question_id {q['question_id']} ({image.name})"
        entries.append(
            make_entry(
                image,
                where,
                question=q["question"],
                answer=a.get("multiple_choice_answer"),
                answers=answers,
                image_id=q["image_id"],
                qtype=a.get("question_type"),
            )
        )
    return IndexedSource(entries, str(qpath), limit)
