"""``ShapesDataset``: the shapes world as a map-style data set of training records.

Each image index draws its scene from :mod:`train.data.shapes.world` and yields records of the
kinds in ``task_mix`` (:data:`TASK_KINDS`): captions, VQA questions, conversations and two-image
questions (the last two as conversation records, :func:`chat_record`), with the curriculum and
pairing options documented on the class.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import replace

from torch.utils.data import Dataset

from train.data.shapes.world import (
    BASE_SIZE,
    MAX_OBJECTS,
    MIN_IMAGE_SIZE,
    SHAPES,
    ShapesScene,
    caption,
    conversation,
    hard_negatives,
    questions,
    render,
    sample_scene,
    scene_rng,
    scene_seed,
    two_image_question,
)

TASK_KINDS = ("caption", "vqa", "chat", "two_image")  # task_mix keys: records of each kind per image


def chat_record(images: list, turns: list[tuple[str, str, str]], image_id: str, image_ids: list[str]) -> dict:
    """A conversation record (mmgpt.conversation): the images in the first user turn, then the turns."""
    messages = []
    for k, (_, q, a) in enumerate(turns):
        content = [{"type": "image"} for _ in images] if k == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": q}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return {"task": "chat", "messages": messages, "images": list(images), "image": images[0], "prompt": "",
            "target": "", "image_id": image_id, "image_ids": image_ids, "qtypes": [t for t, _, _ in turns]}


def _share(rate: float, i: int) -> int:
    """Records of a kind for image ``i`` at ``rate`` per image (0.5: images 1, 3, 5, ...)."""
    return int((i + 1) * rate + 1e-9) - int(i * rate + 1e-9)


class ShapesDataset(Dataset):
    """Map-style shapes data set.

    ``size`` images; each image gives ``task_mix["caption"]`` caption records and
    ``task_mix["vqa"]`` questions drawn without repeats, question type first (uniform over
    the types the scene allows), then a question of that type. Index ``i`` is record
    ``i % per_image`` of image ``i // per_image``; the same (seed, split, index) always gives
    the same pixels and text. With ``grouped=True`` index ``i`` is image ``i`` and returns the
    list of its records, all sharing one PIL image (encode it once).

    ``single_object_first=N`` is a curriculum: images ``0 .. N-1`` hold one object each, and the
    data set asks to be read in order (``ordered``; every index is already an independent random
    scene, so nothing is lost by not shuffling). One-object scenes make captions in a batch differ
    by shape alone, which is what teaches the encoder shape (see configs/train/shapes-tiny.yaml).

    ``shape_pairs=True`` makes every odd image its even predecessor with one object's shape changed
    (same layout, colours and sizes; read in order, so both land in one batch): a contrastive
    objective then has to tell the two captions apart by that shape.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        image_size: int = BASE_SIZE,
        task_mix: dict[str, int] | None = None,
        seed: int = 0,
        grouped: bool = False,
        single_object_first: int = 0,
        shape_pairs: bool = False,
        hard_negatives: int = 0,
    ):
        scene_seed(split, max(0, size - 1), seed)  # validates split, size and seed
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"shapes image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
        if not isinstance(single_object_first, int) or single_object_first < 0:
            raise ValueError(f"single_object_first must be an image count >= 0, got {single_object_first!r}")
        if not isinstance(hard_negatives, int) or hard_negatives < 0:
            raise ValueError(f"hard_negatives must be a count >= 0, got {hard_negatives!r}")
        self.single_object_first, self.shape_pairs = single_object_first, bool(shape_pairs)
        self.hard_negatives = hard_negatives
        # read in order so the curriculum comes first and each pair lands in one batch
        self.ordered = single_object_first > 0 or self.shape_pairs
        task_mix = dict(task_mix) if task_mix is not None else {"caption": 1, "vqa": 1}
        unknown = set(task_mix) - set(TASK_KINDS)
        # caption / vqa: records per image; chat / two_image may be fractions (0.5: every other image)
        if unknown or any(isinstance(v, bool) or not isinstance(v, (int, float) if k in ("chat", "two_image") else int)
                          or v < 0 for k, v in task_mix.items()):
            raise ValueError(f"task_mix must map {'/'.join(TASK_KINDS)} to counts >= 0 (chat and two_image may be "
                             f"fractions), got {task_mix}")
        self.split, self.size, self.image_size, self.seed, self.grouped = (
            split,
            size,
            image_size,
            seed,
            grouped,
        )
        self.n_caption, self.n_vqa = task_mix.get("caption", 0), task_mix.get("vqa", 0)
        self.n_chat, self.n_two = task_mix.get("chat", 0), task_mix.get("two_image", 0)
        # two-image questions pair image 2k with 2k+1: read in order, both land in one batch and are encoded once
        self.ordered = self.ordered or self.n_two > 0
        if self.per_image == 0:
            raise ValueError("task_mix gives no records per image")
        self._last: tuple[int, list[dict]] | None = None

    @property
    def per_image(self) -> int:
        return self.n_caption + self.n_vqa + math.ceil(self.n_chat) + math.ceil(self.n_two)

    def __len__(self) -> int:
        return self.size if self.grouped else self.size * self.per_image

    def __getitem__(self, i: int) -> dict | list[dict]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.grouped:
            return self.group(i)
        image, slot = divmod(i, self.per_image)
        if self._last is None or self._last[0] != image:
            self._last = (image, self.group(image))
        recs = self._last[1]
        return dict(recs[slot % len(recs)])  # fractional chat / two_image: some images have fewer records

    def image_id(self, i: int) -> str:
        return f"shapes-{self.split}-{self.seed}-{i}"

    def scene(self, i: int) -> tuple[ShapesScene, random.Random]:
        """Scene ``i`` and the generator that drew it (it goes on to pick the questions)."""
        if self.shape_pairs and i % 2:
            base, _ = self._scene(i - 1)
            rng = scene_rng(self.split, i, self.seed)
            k = rng.randrange(len(base.objects))
            old = base.objects[k]
            new = replace(old, shape=rng.choice([s for s in SHAPES if s != old.shape]))
            return replace(base, objects=base.objects[:k] + (new,) + base.objects[k + 1 :]), rng
        return self._scene(i)

    def _scene(self, i: int) -> tuple[ShapesScene, random.Random]:
        rng = scene_rng(self.split, i, self.seed)
        return sample_scene(rng, self.image_size, 1 if i < self.single_object_first else MAX_OBJECTS), rng

    def _records(self, scene: ShapesScene, i: int, n_caption: int, qs: list[tuple[str, str, str]]):
        image, cap, iid = render(scene), caption(scene), self.image_id(i)
        negs = {}
        if self.hard_negatives and n_caption:
            # own generator: the scene and question draws stay what they are without negatives
            negs = {"negatives": hard_negatives(scene, random.Random(scene_seed(self.split, i, self.seed) ^ 0x5EED),
                                                self.hard_negatives)}
        recs = [
            {
                "image": image,
                "task": "caption",
                "prompt": "",
                "target": cap,
                "references": [cap],
                "image_id": iid,
                "ctype": f"{len(scene.objects)}_objects",  # evaluation reports exact match per object count
                **negs,
            }
            for _ in range(n_caption)
        ]
        recs += [
            {
                "image": image,
                "task": "vqa",
                "prompt": q,
                "target": a,
                "answers": [a],
                "image_id": iid,
                "qtype": t,
            }
            for t, q, a in qs
        ]
        return recs

    def group(self, i: int) -> list[dict]:
        """The records of image ``i``: its captions, then its sampled questions."""
        scene, rng = self.scene(i)
        all_qs = questions(scene)
        chosen: list[tuple[str, str, str]] = []
        pool: dict[str, list] = {}
        for _ in range(self.n_vqa):
            if not any(pool.values()):  # (re)fill; repeats only when asking for more than exist
                pool = {}
                for q in all_qs:
                    pool.setdefault(q[0], []).append(q)
            qtype = rng.choice([t for t, v in pool.items() if v])
            chosen.append(pool[qtype].pop(rng.randrange(len(pool[qtype]))))
        recs = self._records(scene, i, self.n_caption, chosen)
        n_chat, n_two = _share(self.n_chat, i), _share(self.n_two, i)
        if n_chat or n_two:
            recs += self._chat_records(scene, i, recs[0]["image"] if recs else render(scene), n_chat, n_two)
        return recs

    def partner(self, i: int) -> int:
        """The other image of image ``i``'s two-image questions: its pair neighbour (2k <-> 2k+1; the last image
        of an odd-sized set pairs with the one before it)."""
        j = i ^ 1
        return j if j < self.size else i - 1

    def _chat_records(self, scene: ShapesScene, i: int, image, n_chat: int, n_two: int) -> list[dict]:
        """``n_chat`` conversations about image ``i`` and ``n_two`` questions about it and its partner, from
        their own generator (the caption and question draws stay what they were without them)."""
        rng = random.Random(f"shapes-chat:{scene_seed(self.split, i, self.seed)}")
        iid = self.image_id(i)
        out = []
        for _ in range(n_chat):
            turns = conversation(scene, rng)
            if turns is not None:
                out.append(chat_record([image], turns, iid, [iid]))
        if n_two and self.size > 1:
            j = self.partner(i)
            second, _ = self.scene(j)
            pimg, pid = render(second), self.image_id(j)  # the collator finds it by id when j is in the batch
            for _ in range(n_two):
                first_is_self = rng.random() < 0.5  # the image of the group comes first or second
                a, b = (scene, second) if first_is_self else (second, scene)
                ims = [image, pimg] if first_is_self else [pimg, image]
                ids = [iid, pid] if first_is_self else [pid, iid]
                out.append(chat_record(ims, [two_image_question(a, b, rng)], iid, ids))
        return out

    def records_for_image(self, i: int, chat: int = 0, two_image: int = 0) -> list[dict]:
        """Caption and every valid question of image ``i`` (for evaluation), and ``chat`` conversations and
        ``two_image`` two-image questions when asked."""
        scene, _ = self.scene(i)
        recs = self._records(scene, i, 1, questions(scene))
        if chat or two_image:
            recs += self._chat_records(scene, i, recs[0]["image"], chat, two_image)
        return recs

    def iter_groups(self, start: int = 0, stop: int | None = None) -> Iterator[list[dict]]:
        """Yield ``group(i)`` for images ``start .. stop-1``."""
        for i in range(start, self.size if stop is None else min(stop, self.size)):
            yield self.group(i)

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"task_mix={{'caption': {self.n_caption}, 'vqa': {self.n_vqa}"
            + (f", 'chat': {self.n_chat}" if self.n_chat else "") + (f", 'two_image': {self.n_two}" if self.n_two else "")
            + f"}}, seed={self.seed}"
            + (f", single_object_first={self.single_object_first}" if self.single_object_first else "")
            + (f", hard_negatives={self.hard_negatives}" if self.hard_negatives else "")
            + (", shape_pairs=True)" if self.shape_pairs else ")")
        )
