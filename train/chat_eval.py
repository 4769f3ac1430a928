"""Evaluate conversations: every assistant turn answered after the true turns before it.

Each chat record (``task: "chat"``, mmgpt.conversation) gives one question per assistant turn: the
conversation up to that turn's user message, with the reference turns before it (teacher forcing, as
multi-turn VQA benchmarks score), and the reference answer. An answer is right when it equals the reference
after lower-casing and stripping. Shapes records carry ``qtypes`` (one per assistant turn: ``followup``
for questions about "it", ``which_image`` / ``both`` / ``total`` for two-image questions); accuracy is
reported overall, per type, and for the two families the demo reports: ``chat_followup_accuracy`` and
``chat_two_image_accuracy`` (questions about two images).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from mmgpt.conversation import normalize, text_of
from mmgpt.processor import image_slots

TWO_IMAGE_TYPES = ("which_image", "both", "total")


def chat_questions(records: Iterable[dict]) -> list[dict]:
    """One item per assistant turn: {"messages" (through the user turn), "images", "answer", "qtype"}."""
    out = []
    for r in records:
        if r.get("task") != "chat":
            continue
        msgs, images = normalize(r["messages"], r.get("images"))
        qtypes = list(r.get("qtypes") or [])
        turn = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            qtype = qtypes[turn] if turn < len(qtypes) else None
            if len(images) > 1 and qtype is None:
                qtype = "two_image"
            out.append({"messages": msgs[:i], "images": images, "answer": text_of(m), "qtype": qtype,
                        "image_id": r.get("image_id")})
            turn += 1
    return out


@torch.no_grad()
def answer_questions(model, processor, items: list[dict], batch_size: int = 64, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers, in batches that mix image counts (left-padded prompts, `image_slots`)."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        enc = [processor.encode_conversation(it["messages"], add_generation_prompt=True, max_length=1 << 30)[0]
               for it in chunk]
        ids = processor.pad(enc, side="left").to(device)
        mask = processor.pad([[1] * len(e) for e in enc], side="left", value=0).to(device)
        pixels = processor.pixel_values([im for it in chunk for im in it["images"]]).to(device)
        slots = image_slots([len(it["images"]) for it in chunk]).to(device)
        out = model.generate(pixel_values=pixels, image_slots=slots, input_ids=ids, attention_mask=mask,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        answers += processor.batch_decode(out[:, ids.shape[1]:])
    return answers


def evaluate_chat(model, processor, records: Iterable[dict], batch_size: int = 64) -> tuple[dict, list[dict]]:
    """-> (metrics, examples). No chat records: no metrics."""
    items = chat_questions(records)
    if not items:
        return {}, []
    was_training = model.training
    model.eval()
    try:
        answers = answer_questions(model, processor, items, batch_size)
    finally:
        model.train(was_training)
    hits = [a.strip().lower() == it["answer"].strip().lower() for a, it in zip(answers, items)]
    metrics = {"chat_accuracy": sum(hits) / len(hits), "chat_questions": len(hits)}
    by_type: dict[str, list[bool]] = defaultdict(list)
    for it, h in zip(items, hits):
        by_type[it["qtype"] or "other"].append(h)
        if it["qtype"] in TWO_IMAGE_TYPES or it["qtype"] == "two_image":
            by_type["_two_image"].append(h)
    for t, hs in sorted(by_type.items()):
        if t == "_two_image":
            metrics["chat_two_image_accuracy"] = sum(hs) / len(hs)
        elif t == "followup":
            metrics["chat_followup_accuracy"] = sum(hs) / len(hs)
        else:
            metrics[f"chat_accuracy/{t}"] = sum(hs) / len(hs)
    examples = [{"task": "chat", "image_id": it["image_id"], "image": it["images"][0], "question": text_of(it["messages"][-1]),
                 "answer": a, "answers": [it["answer"]], "qtype": it["qtype"]} for it, a in zip(items, answers)]
    return metrics, examples
