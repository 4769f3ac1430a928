"""Readers for conversations: the LLaVA JSON format and the ``messages`` + ``images`` layout (TRL's).

Both give the conversation record of ``mmgpt.conversation`` (task ``chat``), built by
``train.data.records.chat_record``:

- **LLaVA** (``llava:FILE.json[:IMAGES_DIR]``): a JSON list (or JSONL) of
  ``{"id", "image": "path" or ["p1", "p2"], "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
  {"from": "gpt", "value": "..."}]}``. Image paths are relative to ``IMAGES_DIR`` (default: the JSON's
  folder). Each ``<image>`` marks where the next image goes; a conversation without one but with one
  image gets it at the start of its first human turn (as LLaVA's own preprocessing does). ``from``:
  ``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system`` -> system.
- **messages + images** (``hf:NAME`` with those columns, a JSONL row with those keys, a WebDataset
  sample's ``.json``): ``messages`` in the shape ``mmgpt.conversation`` reads (content parts
  ``{"type": "image"}`` / ``{"type": "text", "text": ...}``), ``images`` the images in order (PIL,
  bytes, ``{"bytes", "path"}`` dicts, or paths).

A conversation that cannot train is a counted bad record, as everywhere (``train.data.bad``):
``image_count`` (placeholders or image parts and images differ in number), ``no_assistant_turn``,
``empty_assistant_turn``, ``bad_conversation`` (an unknown role, a message that is not a dict),
``no_image`` (a text-only conversation: the collator trains conversations about images), and the image
reasons (``missing_file``, ``corrupt_image``, ...) when an image is read.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train.data.bad import (
    BAD_CONVERSATION,
    EMPTY_ASSISTANT,
    IMAGE_COUNT,
    NO_ASSISTANT,
    DataError,
    DataWarning,
)
from train.data.records import Entry, IndexedSource, clean_text

PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLAVA_KEYS = ("id", "image", "images", "conversations")  # what the LLaVA reader reads of an item
TRAINING_REASONS = {"no assistant turn": NO_ASSISTANT, "an empty assistant turn": EMPTY_ASSISTANT}


def _user_parts(text: str) -> list[dict]:
    """A human turn's text as parts: an image part for each ``<image>``, the text around it stripped."""
    parts: list[dict] = []
    for k, piece in enumerate(text.split(PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        piece = piece.strip()
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _conversation():
    """``mmgpt.conversation``, imported when a conversation is read (train.data imports no mmgpt at module
    level: importing the data layer stays cheap)."""
    from mmgpt import conversation

    return conversation


def llava_messages(conversations: Any, n_images: int) -> list[dict]:
    """LLaVA's ``conversations`` as messages (list-of-parts content). ConversationError names the turn."""
    ConversationError = _conversation().ConversationError
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ConversationError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ConversationError(f"conversations[{i}] must be a dict with 'from' and 'value'")
        role = LLAVA_ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise ConversationError(
                f"conversations[{i}].from is {turn.get('from')!r}: use human, gpt or system")
        value = turn.get("value", turn.get("content"))
        value = "" if value is None else str(value)
        if role == "user":
            content = _user_parts(value)
        elif PLACEHOLDER in value:
            raise ConversationError(f"conversations[{i}]: an <image> in a {turn.get('from')} turn; images go in "
                                    "human turns")
        else:
            content = [{"type": "text", "text": value.strip()}] if value.strip() else []
        messages.append({"role": role, "content": content})
    placed = sum(p["type"] == "image" for m in messages for p in m["content"])
    if placed == 0 and n_images == 1:  # LLaVA: no placeholder, one image -> before the first human turn's text
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is not None:
            first["content"].insert(0, {"type": "image"})
    return messages


def chat_entry(messages: Any, images: list, where: str, image_id: Any = None, llava: bool = False) -> Entry:
    """An entry for one conversation, checked now: its normalized messages and image references, or the
    reason it is a bad record (``Entry.bad``), which reading it then reports."""
    conv = _conversation()
    entry = Entry(None, "chat", "", "", where, image_id=clean_text(image_id) or None, images=list(images))
    try:
        raw = llava_messages(messages, len(images)) if llava else messages
        if llava:
            placed = sum(p["type"] == "image" for m in raw for p in m["content"])
            if placed != len(images):
                entry.bad = (IMAGE_COUNT, f"{len(images)} image(s) for {placed} <image> placeholder(s)")
                return entry
        entry.messages, entry.images = conv.normalize(raw, images)
    except conv.ConversationError as err:
        counted = "image(s) given" in str(err) or "more image parts" in str(err)  # normalize's count errors
        entry.bad = (IMAGE_COUNT if counted else BAD_CONVERSATION, str(err))
        return entry
    reason = conv.validate_for_training(entry.messages)
    if reason is not None:
        entry.bad = (TRAINING_REASONS.get(reason, BAD_CONVERSATION), reason)
    return entry


def _as_list(value: Any) -> list:
    if value is None or (isinstance(value, str) and not value):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _image_path(value: Any, root: Path) -> Any:
    if isinstance(value, str):
        p = Path(value)
        return p if p.is_absolute() else root / p
    return value  # bytes, PIL, {"bytes", "path"} dicts: as they are


def is_chat_row(row: Mapping) -> bool:
    """A row (JSONL line, WebDataset ``.json``, dataset columns) that holds a conversation."""
    return "conversations" in row or "messages" in row


def chat_entry_from_row(row: Mapping, where: str, root: Path | None = None, images: list | None = None) -> Entry:
    """The conversation of a row: LLaVA ``conversations`` + ``image``/``images``, or ``messages`` +
    ``images``. ``images`` (a WebDataset sample's image members) replace the row's own image keys."""
    if images is None:
        images = _as_list(row.get("images", row.get("image")))
        if root is not None:
            images = [_image_path(x, root) for x in images]
    image_id = row.get("id", row.get("image_id"))
    if "conversations" in row:
        return chat_entry(row["conversations"], images, where, image_id, llava=True)
    entry = chat_entry(row["messages"], images, where, image_id)
    if root is not None and entry.images:  # image parts that carry a relative path: relative to the file
        entry.images = [_image_path(x, root) for x in entry.images]
    return entry


def _read_llava_items(path: Path) -> list[tuple[str, Any]]:
    """``(where, item)`` for each item of a JSON list (``path:item N``) or JSONL file (``path:LINE``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read LLaVA JSON file ({e})") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        return [(f"{path}:item {i}", item) for i, item in enumerate(data)]
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e}); a LLaVA file is a JSON list or JSONL") from e
    return items


def read_llava(path: str | Path, images: str | Path | None = None, limit: int | None = None) -> IndexedSource:
    """A LLaVA conversation file as a map-style source; image paths are relative to ``images`` (default:
    the file's folder). An item without ``conversations`` is a schema error naming it; keys the reader
    does not use are said once (a :class:`DataWarning`)."""
    path = Path(path)
    root = Path(images) if images else path.parent
    if images and not root.is_dir():
        raise DataError(f"{root}: the LLaVA image folder does not exist")
    entries, unused = [], set()
    for where, item in _read_llava_items(path):
        if not isinstance(item, Mapping) or "conversations" not in item:
            found = sorted(item) if isinstance(item, Mapping) else f"a JSON {type(item).__name__}"
            raise DataError(f"{where}: expected a LLaVA item with 'conversations' (and 'image' for its image "
                            f"path, 'id'); found {found}")
        unused |= set(item) - set(LLAVA_KEYS)
        entries.append(chat_entry_from_row({k: v for k, v in item.items() if k != "messages"}, where, root))
    if not entries:
        raise DataError(f"{path}: no conversations (an empty LLaVA file)")
    if unused:
        warnings.warn(f"{path}: keys {sorted(unused)} of its items are not read (the LLaVA reader reads "
                      f"{', '.join(LLAVA_KEYS)})", DataWarning, stacklevel=2)
    return IndexedSource(entries, str(path), limit)
