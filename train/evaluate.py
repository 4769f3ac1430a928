"""Evaluate a model on records: captioning, visual question answering and image-text retrieval.

Records (see ``train.data.records``) are grouped by image (``image_id``, else the file or row the
image was read from, else the image object), so each image is captioned once, its questions are
asked, and its reference captions are the retrieval texts. Generation uses left-padded prompts and
keeps only the new tokens; the metrics come from ``train.metrics`` (COCO caption scorers, VQAv2
accuracy, Recall@K).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgpt.api import check_generation_options
from train.data.bad import BadDataCounter, split_bad
from train.data.records import image_key
from train.metrics import CAPTION_METRICS, OFFICIAL_ANSWERS, caption_metrics, retrieval_metrics, vqa_score

TASKS = ("caption", "vqa", "retrieval", "chat")  # chat: every assistant turn of the conversations (chat_eval)


@dataclass
class Question:
    question: str
    answers: list[str]
    qtype: str | None = None


@dataclass
class ImageGroup:
    """One image and everything the records say about it."""

    key: Any
    image: Any  # PIL image
    references: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    ctype: str | None = None  # caption type (shapes: "1_objects" ...): exact match is also reported per type


@dataclass
class EvalResult:
    metrics: dict[str, float]
    # One dict per captioned image ({"task": "caption", "image_id", "image", "caption", "references"})
    # and one per question ({"task": "vqa", "image_id", "image", "question", "answer", "answers", "qtype"}).
    examples: list[dict] = field(default_factory=list)
    # The bad records skipped, each named (file and line, shard and key, dataset row) with its reason.
    bad: BadDataCounter = field(default_factory=BadDataCounter)
    # How many questions each VQA accuracy rule scored (train.metrics.vqa_accuracy): "official_10_answers"
    # (ten reference answers, the VQAv2 rule), "one_answer" (exact match) and "any_of_k_answers" (another
    # number of answers: 1 if any matches).
    vqa_rules: dict[str, int] = field(default_factory=dict)
    conversations: int = 0  # conversation records (task "chat") read and not scored here

    def table(self) -> str:
        """The metrics as an aligned two-column table."""
        if not self.metrics:
            return "(no metrics)"
        width = max(len(k) for k in self.metrics)
        lines = []
        for key, value in self.metrics.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{key:<{width}}  {text}")
        return "\n".join(lines)


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, no trailing period: what caption exact match compares."""
    text = " ".join(str(text).lower().split())
    return re.sub(r"[\s.]+$", "", text)


def _items(records: Iterable) -> Iterable:
    """Iterate a list, an iterable dataset, or a map-style dataset (by index)."""
    if isinstance(records, (list, tuple)) or hasattr(type(records), "__iter__"):
        yield from records
    elif hasattr(records, "__len__") and hasattr(records, "__getitem__"):
        for i in range(len(records)):
            yield records[i]
    else:
        yield from records


# How many bad records an evaluation names (all are counted).
NAMED_BAD = 50


def group_records(records: Iterable, max_images: int | None = None) -> tuple[list[ImageGroup], int]:
    """-> (images in first-seen order, number of bad records skipped); see :func:`read_groups`."""
    groups, bad, _ = read_groups(records, max_images)
    return groups, bad.total


def read_groups(records: Iterable, max_images: int | None = None
                ) -> tuple[list[ImageGroup], BadDataCounter, list[dict]]:
    """-> (images in first-seen order, the bad records skipped, counted by reason and named, the number of
    conversation records left out).

    Bad records (None or ``BadRecord`` markers) are skipped and counted; lists of records (grouped
    sources) are flattened; conversations (task "chat") are not scored here and are left out. With
    ``max_images``, reading stops at the first record of a further image.
    """
    groups: dict[Any, ImageGroup] = {}
    counter = BadDataCounter(keep=NAMED_BAD)
    chats: list[dict] = []  # conversation records (scored by train.chat_eval)
    index = 0
    for item in _items(records):
        good, bad = split_bad([item])
        counter.add(bad)
        for rec in good:
            if rec.get("task") == "chat":
                chats.append(rec)
                continue
            key = image_key(rec)
            group = groups.get(key)
            if group is None:
                if max_images is not None and len(groups) >= max_images:
                    return list(groups.values()), counter, chats
                iid = rec.get("image_id")
                group = groups[key] = ImageGroup(key=str(iid) if iid is not None else f"image-{index}", image=rec["image"])
                index += 1
            if rec.get("task") == "vqa":
                answers = list(rec.get("answers") or [rec["target"]])
                group.questions.append(Question(rec["prompt"], answers, rec.get("qtype")))
            else:
                group.ctype = group.ctype or rec.get("ctype")
                for ref in rec.get("references") or [rec["target"]]:
                    ref = ref.strip()
                    if ref and ref not in group.references:
                        group.references.append(ref)
    return list(groups.values()), counter, chats


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.inference_mode()
def generate_texts(
    model, processor, images: Sequence, tasks: Sequence[str], prompts: Sequence[str], batch_size: int, **gen
) -> list[str]:
    """Generate for (image, task, prompt) triples in batches; only the new tokens are decoded."""
    device, dtype = _device_dtype(model)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        j = i + batch_size
        batch = processor.batch_prompts(tasks[i:j], prompts[i:j])  # left-padded (B, T)
        ids = batch["input_ids"].to(device)
        seqs = model.generate(
            pixel_values=processor.images(list(images[i:j])).to(device, dtype),
            input_ids=ids,
            attention_mask=batch["attention_mask"].to(device),
            **gen,
        )  # (B, T + new)
        out += processor.batch_decode(seqs[:, ids.shape[1] :])
    return out


@torch.inference_mode()
def embed(model, processor, images: Sequence, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """-> (N_img, N_txt) cosine similarities of image and image-free text embeddings."""
    device, dtype = _device_dtype(model)
    img = [
        model.embed_image(processor.images(list(images[i : i + batch_size])).to(device, dtype)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    txt = []
    for i in range(0, len(texts), batch_size):
        batch = processor.batch_texts(texts[i : i + batch_size])
        txt.append(model.embed_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
    return torch.cat(img) @ torch.cat(txt).T  # (N_img, E) @ (E, N_txt)


def evaluate(
    model,
    processor,
    records: Iterable,
    tasks: Sequence[str] | str = TASKS,
    batch_size: int = 64,
    max_new_tokens: int = 24,
    num_beams: int = 1,
    device=None,
    max_images: int | None = None,
    caption_scorers: Sequence[str] = CAPTION_METRICS,
) -> EvalResult:
    """Caption, question-answering and retrieval metrics of ``model`` on ``records``.

    ``tasks``: any of "caption", "vqa", "retrieval" (or "all"). A task the records have no data for
    (no captions, no questions) adds no metrics. ``device``: move the model there first (default:
    where it is). The model runs in eval mode and is put back in its previous mode afterwards.
    ``max_images``: stop reading at the first record of image N+1. ``caption_scorers``: the COCO
    scorers to run (leave out "meteor" to skip its Java VM, which takes seconds to start).
    """
    tasks = TASKS if tasks == "all" else ((tasks,) if isinstance(tasks, str) else tuple(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)} or 'all'")
    check_generation_options({"num_beams": num_beams, "max_new_tokens": max_new_tokens}, batch_size)
    if device is not None:
        model.to(device)
    gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}
    from train import dist_eval  # under several processes each runs its share of the images (gathered)

    groups, bad, chats = read_groups(records, max_images)
    captioned = [g for g in groups if g.references]
    questions = [(g, q) for g in groups for q in g.questions]
    metrics: dict[str, float] = {}
    examples: list[dict] = []
    vqa_rules: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        if "caption" in tasks and captioned:
            n = len(captioned)
            caps = dist_eval.generate_texts(model, processor, [g.image for g in captioned], ["caption"] * n, [""] * n,
                                  batch_size, **gen)
            hits = [
                normalize_caption(c) in {normalize_caption(r) for r in g.references} for g, c in zip(captioned, caps)
            ]
            metrics["caption_exact_match"] = sum(hits) / n
            for ctype in sorted({g.ctype for g in captioned if g.ctype}):
                sel = [h for g, h in zip(captioned, hits) if g.ctype == ctype]
                metrics[f"caption_exact_match/{ctype}"] = sum(sel) / len(sel)
            if caption_scorers:
                metrics.update(caption_metrics({i: c for i, c in enumerate(caps)},
                                               {i: g.references for i, g in enumerate(captioned)},
                                               metrics=caption_scorers))
            examples += [
                {"task": "caption", "image_id": g.key, "image": g.image, "caption": c, "references": g.references}
                for g, c in zip(captioned, caps)
            ]
        if "vqa" in tasks and questions:
            n = len(questions)
            answers = dist_eval.generate_texts(model, processor, [g.image for g, _ in questions], ["vqa"] * n,
                                     [q.question for _, q in questions], batch_size, **gen)
            qtypes = None
            if any(q.qtype for _, q in questions):
                qtypes = [q.qtype or "other" for _, q in questions]
            metrics.update(vqa_score(answers, [q.answers for _, q in questions], qtypes))
            # which rule scored them (train.metrics.vqa_accuracy): the official one needs ten answers
            counts = [len(q.answers) for _, q in questions]
            official, single = counts.count(OFFICIAL_ANSWERS), counts.count(1)
            vqa_rules = {"official_10_answers": official, "one_answer": single,
                         "any_of_k_answers": n - official - single}
            examples += [
                {"task": "vqa", "image_id": g.key, "image": g.image, "question": q.question, "answer": a,
                 "answers": q.answers, "qtype": q.qtype}
                for (g, q), a in zip(questions, answers)
            ]
        if "retrieval" in tasks and captioned:
            texts = [r for g in captioned for r in g.references]
            owner = [i for i, g in enumerate(captioned) for _ in g.references]  # text -> image index
            sim = dist_eval.embed(model, processor, [g.image for g in captioned], texts, batch_size)  # (N_img, N_txt)
            # text_keys: identical captions of different images are equally right answers.
            metrics.update(retrieval_metrics(sim, text_to_image=owner, text_keys=texts, ks=(1, 5, 10)))
        if "chat" in tasks and chats:
            from train.chat_eval import evaluate_chat

            chat_metrics, chat_examples = evaluate_chat(model, processor, chats, batch_size)
            metrics.update(chat_metrics)
            examples += chat_examples
    finally:
        model.train(was_training)
    metrics["num_images"] = len(groups)
    metrics["num_questions"] = len(questions)
    metrics["bad_records"] = bad.total
    return EvalResult(metrics=metrics, examples=examples, bad=bad, vqa_rules=vqa_rules,
                      conversations=0 if "chat" in tasks else len(chats))
