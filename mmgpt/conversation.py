"""Conversations: the one message shape every part of mmgpt speaks (data, template, model, API, server).

A conversation is a list of messages, as in transformers' chat templates and TRL's datasets::

    [{"role": "system", "content": "You answer about shapes."},
     {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                  {"type": "text", "text": "which image has a triangle?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "the second"}]},
     {"role": "user", "content": "how many objects are there in total?"}]

- roles: ``system``, ``user``, ``assistant``; ``content`` a string or a list of parts.
- parts: ``{"type": "text", "text": str}`` and ``{"type": "image"}``. An image part may carry its image
  (``"image"``: a PIL image, path, bytes or array, as transformers' processors take it); image parts that
  do not take the conversation's ``images`` list in order (TRL's ``messages`` + ``images`` layout).
- any number of images per conversation, in user turns only; assistant turns are text.

A training record of a conversation (``train.data.records``) is::

    {"task": "chat", "messages": <normalized>, "images": [PIL.Image, ...], "image": images[0] or None,
     "prompt": "", "target": "", "image_id": ..., "image_source": ...}

Caption and VQA records stay as they are: they are conversations of one turn
(:func:`record_to_messages`), and encode to the same tokens either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation that cannot be read; the message names the message index and field."""


def _clean(text: str) -> str:
    """Lone surrogates (undecodable bytes that Python kept, e.g. from a terminal or a JSON escape) as '?': the
    tokenizer cannot encode them (a TypeError deep inside before)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _parts(content: Any, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": _clean(content)}] if content else []
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise ConversationError(f"{where}.content must be a string or a list of parts, not {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            out.append({"type": "text", "text": _clean(part)})
            continue
        if not isinstance(part, dict):
            raise ConversationError(f"{where}.content[{j}] must be a dict with a 'type', not {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ConversationError(f"{where}.content[{j}] is a text part without a 'text' string")
            out.append({"type": "text", "text": _clean(text)})
        elif kind == "image":
            img = part.get("image", part.get("path", part.get("url")))
            out.append({"type": "image", **({"image": img} if img is not None else {})})
        else:
            raise ConversationError(f"{where}.content[{j}] has type {kind!r}: use 'text' or 'image'")
    return out


def normalize(messages: Any, images: Sequence | None = None) -> tuple[list[dict], list]:
    """-> (messages with list-of-parts content and bare image parts, the images in order).

    Image parts that carry an image contribute it; the others take ``images`` in order. A count that does
    not match is a ConversationError saying both numbers."""
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("messages must be a non-empty list of {'role', 'content'} dicts")
    given = list(images) if images is not None else []
    taken = 0
    out_msgs, out_images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ConversationError(f"{where} must be a dict with 'role' and 'content', not {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ConversationError(f"{where}.role is {role!r}: use one of {', '.join(ROLES)}")
        parts = _parts(m.get("content"), where)
        clean = []
        for p in parts:
            if p["type"] == "image":
                if role != "user":
                    raise ConversationError(f"{where}: images go in user turns, not in a {role} turn")
                if "image" in p:
                    out_images.append(p["image"])
                else:
                    if taken >= len(given):
                        raise ConversationError(
                            f"the messages have more image parts than the {len(given)} image(s) given")
                    out_images.append(given[taken])
                    taken += 1
                clean.append({"type": "image"})
            else:
                clean.append(p)
        out_msgs.append({"role": role, "content": clean})
    if taken < len(given):
        raise ConversationError(f"{len(given)} image(s) given for {taken} image part(s) in the messages")
    return out_msgs, out_images


def text_of(message: dict) -> str:
    """The text parts of a normalized message, joined by a space."""
    return " ".join(p["text"].strip() for p in message["content"] if p["type"] == "text" and p["text"].strip())


def num_images(message: dict) -> int:
    return sum(p["type"] == "image" for p in message["content"])


def record_to_messages(task: str, prompt: str, target: str | None = None) -> list[dict]:
    """A caption / VQA record as the one-turn conversation it is: the user gives the image (and the
    question), the assistant the caption (or the answer)."""
    user: list[dict] = [{"type": "image"}]
    if task == "vqa":
        user.append({"type": "text", "text": prompt})
    elif task != "caption":
        raise ConversationError(f"task {task!r} is not a caption or a question")
    msgs = [{"role": "user", "content": user}]
    if target is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    return msgs


def validate_for_training(messages: list[dict]) -> str | None:
    """The reason a normalized conversation cannot train (no assistant turn, an empty assistant turn),
    or None."""
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        return "no assistant turn"
    if any(not text_of(m) for m in assistants):
        return "an empty assistant turn"
    return None
