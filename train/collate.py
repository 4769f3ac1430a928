"""Collator: records (or per-image groups of records) -> one model batch.

Images are transformed once per group, and each text row points at its image (`image_index`),
so a caption and several questions about one image cost one encoder pass.
"""

from __future__ import annotations

import os
import zlib

import torch

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
        n_itc = 0  # ITC rows so far
        for g in groups:
            pixels.append(g[0]["image"])
            # an image read from a file (or a dataset row) is known by where it came from: ids of two
            # sources can collide (the feature cache and ITC's image ids use this key); else its id
            image_ids.append(g[0].get("image_source") or g[0].get("image_id"))
            for r in g:
                image_index.append(len(pixels) - 1)
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
        batch = {"bad": bad, "num_images": len(pixels), "num_rows": len(tasks), "image_ids": image_ids}
        if not pixels:
            return batch
        text = p.batch_examples(tasks, prompts, targets)
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


# itc_images and the three itc_negative_* keys only when present in a batch
MODEL_KEYS = ("pixel_values", "image_index", "itc_mask", "itc_groups", "itc_images", "input_ids", "attention_mask",
              "labels", "itc_negative_ids", "itc_negative_mask", "itc_negative_owner")
