"""The record every source yields, and the map-style base that indexes text once and loads
images lazily.

A record is a dict::

    {"image": PIL.Image (RGB), "task": "caption" | "vqa", "prompt": str, "target": str,
     # optional:
     "answers": list[str],     # all reference answers (VQA)
     "references": list[str],  # all reference captions of the image (captions)
     "image_id": str,          # stable id of the image
     "image_source": str,      # where the image was read from (its path, or dataset and row)
     "qtype": str}             # question type (shapes)

A conversation (``task`` "chat", read by ``train.data.chat``) is the record ``mmgpt.conversation`` fixes:
``{"task": "chat", "messages": [...], "images": [PIL.Image, ...], "image": images[0], "prompt": "",
"target": "", "image_id", "image_source" (the first image), "image_ids" (every image)}``; a conversation
without images is a ``no_image`` bad record.

For captions ``prompt`` is "" and ``target`` the caption; for VQA ``prompt`` is the raw
question (the processor applies the template) and ``target`` the answer. Records of one image
share its ``image_id``, or, when the source has none, its ``image_source`` (:func:`image_key`).
"""

from __future__ import annotations

import difflib
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from encoders.image_io import ImageLoadError, load_image
from train.data.bad import (
    CORRUPT_IMAGE,
    EMPTY_FILE,
    EMPTY_TEXT,
    MISSING_FILE,
    NO_IMAGE,
    NOT_AN_IMAGE,
    BadRecord,
    DataError,
)

# The fields a table-like source (JSONL, CSV, imagefolder, HF dataset, WebDataset JSON) may
# hold, and the column names tried for each, in order, when no column mapping is given.
ROLES: dict[str, tuple[str, ...]] = {
    "image": ("file_name", "image", "image_path", "path", "img"),
    "caption": ("caption", "text"),
    "question": ("question",),
    "answer": ("answer", "multiple_choice_answer"),
    "answers": ("answers",),
    "image_id": ("image_id",),
    "qtype": ("qtype", "question_type"),
    "references": ("references", "captions"),
    # several questions of one image: [{"question", "answer" or "answers"}, ...], or questions as strings
    # with a parallel list of answers in the answers column
    "questions": ("questions", "qa", "qas", "qa_pairs"),
}
TEXT_ROLES = ("caption", "question", "answer", "answers", "questions")


@dataclass(slots=True)
class Entry:
    """One indexed record whose image is not loaded yet.

    ``image`` is a path, raw bytes, a PIL image, or a dict with ``bytes`` and/or ``path``.
    """

    image: Any
    task: str
    prompt: str
    target: str
    where: str
    answers: list[str] | None = None
    references: list[str] | None = None
    image_id: str | None = None
    qtype: str | None = None
    # conversations (task "chat"): normalized messages and their image references in order, or the
    # (reason, detail) that makes the record bad, found when it was indexed
    messages: list | None = None
    images: list | None = None
    bad: tuple[str, str] | None = None


def clean_text(value: Any) -> str:
    """None / NaN -> "", everything else str and stripped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def make_entry(
    image: Any,
    where: str,
    *,
    caption: Any = None,
    question: Any = None,
    answer: Any = None,
    answers: Any = None,
    image_id: Any = None,
    qtype: Any = None,
    references: Any = None,
) -> Entry:
    """Build an :class:`Entry` from loosely typed fields.

    A row with a question or an answer is VQA, anything else a caption. ``answers`` is a list
    (duplicates kept: VQA accuracy counts them); when ``answer`` is empty the target is the
    most common of ``answers``. Empty text is not an error here: the entry becomes a
    ``empty_text`` bad record when read.
    """
    question, answer = clean_text(question), clean_text(answer)
    answers = [answers] if isinstance(answers, str) else answers
    references = [references] if isinstance(references, str) else references
    answers = [a.get("answer") if isinstance(a, dict) else a for a in answers or []]  # VQAv2-style dicts
    answer_list = [a for a in (clean_text(x) for x in answers) if a]
    image_id = clean_text(image_id) or None
    qtype = clean_text(qtype) or None
    if question or answer or answer_list:
        if not answer and answer_list:
            answer = Counter(answer_list).most_common(1)[0][0]
        if not answer_list and answer:
            answer_list = [answer]
        return Entry(
            image, "vqa", question, answer, where, answers=answer_list, image_id=image_id, qtype=qtype
        )
    caption = clean_text(caption)
    refs = [r for r in (clean_text(x) for x in (references or [])) if r] or None
    return Entry(image, "caption", "", caption, where, references=refs, image_id=image_id, qtype=qtype)


def resolve_columns(found: Iterable[str], columns: Mapping[str, str] | None = None) -> dict[str, str]:
    """Map each role (``image``, ``caption``, ...) to the column of ``found`` that holds it.

    ``columns`` overrides the defaults of :data:`ROLES` role by role; a role whose column is
    not among ``found`` is left out.
    """
    columns = dict(columns or {})
    unknown = [r for r in columns if r not in ROLES]
    if unknown:
        near = difflib.get_close_matches(unknown[0], ROLES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown column role {unknown[0]!r}{hint} (roles: {', '.join(ROLES)})")
    found = set(found)
    out = {}
    for role, candidates in ROLES.items():
        names = (columns[role],) if role in columns else candidates
        name = next((n for n in names if n in found), None)
        if name is not None:
            out[role] = name
    return out


def check_schema(
    where: str, found: Iterable[str], mapping: dict[str, str], columns: Mapping | None, noun: str = "columns"
) -> None:
    """Raise :class:`DataError` unless ``mapping`` has an image and a caption or a question with
    an answer. The message names ``where``, what was expected and the columns found."""
    has_text = "caption" in mapping or "questions" in mapping or (
        "question" in mapping and ("answer" in mapping or "answers" in mapping)
    )
    if "image" in mapping and has_text:
        return
    columns = dict(columns or {})

    def names(role: str) -> str:
        return repr(columns[role]) if role in columns else "/".join(ROLES[role])

    expected = (
        f"an image column ({names('image')}) and a caption column ({names('caption')}) or a question "
        f"column ({names('question')}) with an answer column ({names('answer')} or {names('answers')})"
    )
    if noun != "columns":
        expected = expected.replace("column", noun.rstrip("s"))
    raise DataError(f"{where}: expected {expected}; found {noun} {sorted(found)}")


def entries_from_row(row: Mapping[str, Any], mapping: dict[str, str], image: Any, where: str) -> list[Entry]:
    """The entries of a row (dict) under a role -> column mapping: one, or one per caption when
    the caption cell holds a list (each with all of them as references)."""
    fields = {role: row.get(col) for role, col in mapping.items() if role != "image"}
    questions = fields.pop("questions", None)
    if questions:
        return question_entries(questions, fields, image, where)
    captions = fields.get("caption")
    if isinstance(captions, (list, tuple)) and not fields.get("question"):
        refs = fields.pop("references", None) or captions
        return [
            make_entry(image, f"{where} caption {k}", **dict(fields, caption=c), references=refs)
            for k, c in enumerate(captions)
        ] or [make_entry(image, where, **dict(fields, caption=""))]
    return [make_entry(image, where, **fields)]


def question_entries(questions: Any, fields: dict, image: Any, where: str) -> list[Entry]:
    """The entries of a row that holds several questions of one image: its caption (if any), then one
    VQA entry per question. ``questions`` is a list of ``{"question", "answer" and/or "answers"}`` dicts,
    or of question strings with ``fields["answers"]`` the parallel list of answers (each a string or a
    list). Anything else is one ``empty_text`` entry naming the field."""
    shared = {k: fields.get(k) for k in ("image_id",)}
    out = []
    if clean_text(fields.get("caption")):
        out.append(make_entry(image, where, caption=fields["caption"], references=fields.get("references"), **shared))
    parallel = fields.get("answers")
    if not isinstance(questions, (list, tuple)):
        return out + [make_entry(image, f"{where} questions", question="", answer="", **shared)]
    for k, q in enumerate(questions):
        here = f"{where} question {k}"
        if isinstance(q, str):
            ans = parallel[k] if isinstance(parallel, (list, tuple)) and k < len(parallel) else None
            many = ans if isinstance(ans, (list, tuple)) else None
            out.append(make_entry(image, here, question=q, answer=None if many else ans, answers=many, **shared))
        elif isinstance(q, Mapping):
            out.append(make_entry(image, here, question=q.get("question", q.get("q")),
                                  answer=q.get("answer", q.get("a")), answers=q.get("answers"),
                                  qtype=q.get("qtype", q.get("question_type")), **shared))
        else:
            out.append(make_entry(image, here, question="", answer="", **shared))
    return out


def image_source(ref: Any) -> str | None:
    """The path an image reference names (absolute, normalised), or None for in-memory images."""
    if isinstance(ref, dict) and not ref.get("bytes"):  # Hugging Face Image(decode=False)
        ref = ref.get("path")
    if isinstance(ref, (str, os.PathLike)) and os.fspath(ref):
        return os.path.abspath(os.fspath(ref))
    return None


def image_key(rec: Mapping[str, Any]) -> tuple:
    """What identifies a record's image: its ``image_id``, else its ``image_source``, else the image
    object itself (records of one in-memory image share it only when they share the object)."""
    if rec.get("image_id") is not None:
        return ("id", str(rec["image_id"]))
    if rec.get("image_source"):
        return ("source", rec["image_source"])
    return ("object", id(rec["image"]))


def attach_references(entries: list[Entry]) -> None:
    """Give every caption entry without references all captions of the same image."""
    groups: dict[str, list[str]] = defaultdict(list)
    keys = []
    for e in entries:
        key = None
        if e.task == "caption" and e.references is None and e.target:
            key = e.image_id or image_source(e.image)
            if key is not None:
                groups[key].append(e.target)
        keys.append(key)
    for e, key in zip(entries, keys):
        if key is not None:
            e.references = groups[key]


def read_image(ref: Any, where: str) -> Any:
    """Load ``ref`` as an RGB PIL image, or return a :class:`BadRecord` saying why not."""
    if ref is None:
        return BadRecord(MISSING_FILE, where, "no image")
    if isinstance(ref, dict):  # Hugging Face Image(decode=False): {"bytes": ..., "path": ...}
        ref = ref.get("bytes") or ref.get("path")
        if ref is None:
            return BadRecord(MISSING_FILE, where, "image is null")
    if isinstance(ref, (str, os.PathLike)):
        path = Path(ref)
        try:
            size = path.stat().st_size
        except OSError:
            return BadRecord(MISSING_FILE, where, str(path))
        if size == 0:
            return BadRecord(EMPTY_FILE, where, str(path))
    elif isinstance(ref, (bytes, bytearray, memoryview)) and len(ref) == 0:
        return BadRecord(EMPTY_FILE, where, "0 bytes")
    try:
        return load_image(ref)
    except ImageLoadError as e:
        cause = getattr(e, "cause", "")
        reason = {"not an image": NOT_AN_IMAGE, "file not found": MISSING_FILE}.get(cause, CORRUPT_IMAGE)
        if cause.startswith("empty file"):
            reason = EMPTY_FILE
        return BadRecord(reason, where, str(e))


def to_record(e: Entry, image: Any, source: str | None = None) -> dict:
    rec = {"image": image, "task": e.task, "prompt": e.prompt, "target": e.target}
    if e.task == "vqa":
        rec["answers"] = list(e.answers or [e.target])
    else:
        rec["references"] = list(e.references or [e.target])
    if e.image_id is not None:
        rec["image_id"] = e.image_id
    if e.qtype is not None:
        rec["qtype"] = e.qtype
    if source is not None:
        rec["image_source"] = source
    return rec


def chat_record(e: Entry, image_refs: list | None = None) -> dict | BadRecord:
    """A conversation entry's record: every image loaded (``image_refs`` replace the entry's own), or
    the bad marker of the first that cannot be, or of the conversation itself."""
    if e.bad is not None:
        return BadRecord(e.bad[0], e.where, e.bad[1])
    refs = list(e.images or []) if image_refs is None else list(image_refs)
    if not refs:  # the collator encodes a conversation's images; text-only ones are not trained on
        return BadRecord(NO_IMAGE, e.where, "a conversation without images")
    images, sources = [], []
    for k, ref in enumerate(refs):
        image = read_image(ref, e.where)
        if isinstance(image, BadRecord):
            detail = f"image {k + 1} of {len(refs)}: {image.detail}" if len(refs) > 1 else image.detail
            return BadRecord(image.reason, e.where, detail)
        images.append(image)
        sources.append(image_source(ref))
    # each image known by its file, or by where the record is: image_source names the first (the record's
    # `image`), image_ids all of them in order (the collator's keys for images other than the first)
    ids = [src or f"{e.where} image {k}" for k, src in enumerate(sources)]
    rec = {"task": "chat", "messages": e.messages, "images": images, "image": images[0], "prompt": "", "target": "",
           "image_source": ids[0], "image_ids": ids}
    if e.image_id is not None:
        rec["image_id"] = e.image_id
    return rec


def entry_to_record(e: Entry, image_ref: Any = None, source: str | None = None) -> dict | BadRecord:
    """Load the entry's image (or ``image_ref`` when given) and build its record, or return a
    bad marker. ``source`` names where the image came from (default: its path, if it has one)."""
    if e.task == "chat":
        return chat_record(e, image_ref)
    if not e.target or (e.task == "vqa" and not e.prompt):
        what = "question" if e.target else ("answer" if e.task == "vqa" else "caption")
        return BadRecord(EMPTY_TEXT, e.where, f"empty {what}")
    ref = e.image if image_ref is None else image_ref
    image = read_image(ref, e.where)
    if isinstance(image, BadRecord):
        return image
    return to_record(e, image, source or image_source(ref))


class IndexedSource(Dataset):
    """Map-style dataset over entries indexed once; images are loaded in ``__getitem__``.

    ``__getitem__`` returns a record dict, or a :class:`BadRecord` marker (see ``bad.py``).
    """

    def __init__(self, entries: list[Entry], name: str, limit: int | None = None):
        self.entries = entries[:limit] if limit is not None else entries
        self.name = name

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict | BadRecord:
        return entry_to_record(self.entries[i])

    def __repr__(self) -> str:
        tasks = Counter(e.task for e in self.entries)
        return f"{type(self).__name__}({self.name!r}, {len(self)} records, {dict(tasks)})"
