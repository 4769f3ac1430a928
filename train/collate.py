"""Collator: records (or per-image groups of records) -> one model batch.

Images are transformed once per group, and each text row points at its image (`image_index`),
so a caption and several questions about one image cost one encoder pass.
"""

from __future__ import annotations

import os
import zlib

import torch

from mmgpt.conversation import record_to_messages
from train.data.bad import split_bad


def _group(items: list) -> tuple[list[list[dict]], list]:
    """Flatten the DataLoader's items into groups of records sharing one image; collect bad markers."""
    groups, bad = [], []
    for item in items:
        recs, bads = split_bad(item if isinstance(item, list) else [item])
        bad += bads
        if recs:
            groups.append(recs)
    return groups, bad


class Collator:
    def __init__(self, processor, train: bool = True, augment: bool = False, itc_questions: bool = False):
        # itc_questions: question+answer rows join ITC too (their full text), with `itc_images` ids
        self.itc_questions = itc_questions
        self.processor = processor
        self.train = train
        self.augment = augment

    def __call__(self, items: list) -> dict:
        groups, bad = _group(items)
        p = self.processor
        pixels, image_index, tasks, prompts, targets, itc, image_ids = [], [], [], [], [], [], []
        negatives, neg_prompts, neg_owner = [], [], []  # hard-negative captions, per ITC row
        chats: dict[int, list[dict]] = {}  # row -> the conversation's messages
        slots: list[list[int]] = []  # per row: its images, in order
        n_itc = 0  # ITC rows so far
        late: list[tuple[int, int, int]] = []  # (row, slot, group) of images found in another group
        group_pixel: list[int] = []  # each group's image index
        # a conversation's image that is another group's image of this batch (same id) is encoded once
        group_of = {g[0].get("image_id"): k for k, g in enumerate(groups) if g[0].get("image_id") is not None}
        for g in groups:
            pixels.append(g[0]["image"])
            # an image read from a file (or a dataset row) is known by where it came from: ids of two
            # sources can collide (the feature cache and ITC's image ids use this key); else its id
            image_ids.append(g[0].get("image_source") or g[0].get("image_id"))
            own = len(pixels) - 1
            group_pixel.append(own)
            for r in g:
                if r["task"] == "chat":  # a conversation: its images (the group's own one is encoded once)
                    if not r.get("images"):
                        raise ValueError(f"a conversation record without images ({r.get('image_source') or r.get('image_id')}):"
                                         " readers skip these as bad records")
                    row_slots = []
                    ids_ = r.get("image_ids") or ()
                    for j, im in enumerate(r["images"]):
                        if im is g[0]["image"]:
                            row_slots.append(own)
                            continue
                        other = group_of.get(ids_[j]) if j < len(ids_) else None
                        if other is not None:  # groups before this one have their image at their own index
                            late.append((len(slots), len(row_slots), other))
                            row_slots.append(-2)  # filled in once every group's image has its index
                            continue
                        pixels.append(im)
                        image_ids.append(ids_[j] if j < len(ids_) else None)
                        row_slots.append(len(pixels) - 1)
                    chats[len(tasks)] = r["messages"]
                    slots.append(row_slots)
                    image_index.append(row_slots[0])
                    tasks.append("chat")
                    prompts.append("")
                    targets.append("")
                    itc.append(False)
                    continue
                slots.append([own])
                image_index.append(own)
                tasks.append(r["task"])
                prompts.append(r.get("prompt", ""))
                targets.append(r["target"])
                if r["task"] == "caption":
                    for neg in r.get("negatives") or ():
                        negatives.append(neg)
                        neg_prompts.append(r.get("prompt", ""))
                        neg_owner.append(n_itc)  # index among this batch's ITC rows
                itc.append(r["task"] == "caption" or (self.itc_questions and r["task"] == "vqa"))
                n_itc += itc[-1]
        for row, slot, other in late:
            slots[row][slot] = group_pixel[other]
            if slot == 0:
                image_index[row] = group_pixel[other]
        batch = {"bad": bad, "num_images": len(pixels), "num_rows": len(tasks), "image_ids": image_ids}
        if not pixels:
            return batch
        plain = [i for i, t in enumerate(tasks) if t != "chat"]
        pairs: list = [None] * len(tasks)
        inline = p.image_token is not None and bool(chats)  # prefix fusion: every row's images at placeholders
        if plain and not inline:
            for i, pair in zip(plain, p.example_pairs([tasks[i] for i in plain], [prompts[i] for i in plain],
                                                      [targets[i] for i in plain])):
                pairs[i] = pair
        for i in range(len(tasks)):
            if pairs[i] is None:  # a conversation, or a record as its one-turn conversation
                msgs = chats.get(i) or record_to_messages(tasks[i], prompts[i], targets[i])
                pairs[i] = p.encode_conversation(msgs)
        text = p.pad_pairs(pairs)
        # Caption ids for ITC: equal captions share a group (stable across processes: crc32, not hash()).
        # With question rows the text is question + answer ("what color is the circle? red").
        itc_texts = [f"{pr} {t}" if task == "vqa" else t for task, pr, t in zip(tasks, prompts, targets)]
        groups_ids = [zlib.crc32(t.strip().lower().encode()) & 0x7FFFFFFF for t in itc_texts]
        batch.update(
            pixel_values=p.pixel_values(pixels, train=self.train and self.augment),  # (B_img, 3, S, S)
            image_index=torch.tensor(image_index),  # (B,)
            itc_mask=torch.tensor(itc),  # (B,)
            itc_groups=torch.tensor(groups_ids),  # (B,)
            **text,  # input_ids, attention_mask, labels: (B, T)
        )
        if chats:  # (B, M): each row's images, -1 past its own (rows without conversations: one image)
            width = max(len(x) for x in slots)
            batch["image_slots"] = torch.tensor([x + [-1] * (width - len(x)) for x in slots])
        if self.itc_questions:
            keys = [zlib.crc32(str(i if i is not None else ("#", k, os.getpid())).encode()) & 0x7FFFFFFF
                    for k, i in enumerate(image_ids)]
            batch["itc_images"] = torch.tensor([keys[i] for i in image_index])  # (B,)
        if negatives:
            neg = p.batch_examples(["caption"] * len(negatives), neg_prompts, negatives)
            batch.update(
                itc_negative_ids=neg["input_ids"],  # (N, Tn)
                itc_negative_mask=neg["attention_mask"],  # (N, Tn)
                itc_negative_owner=torch.tensor(neg_owner),  # (N,)
            )
        return batch


# image_slots (conversations), itc_images and the three itc_negative_* keys only when present in a batch
MODEL_KEYS = ("pixel_values", "image_index", "image_slots", "itc_mask", "itc_groups", "itc_images", "input_ids", "attention_mask",
              "labels", "itc_negative_ids", "itc_negative_mask", "itc_negative_owner")
