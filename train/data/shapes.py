"""The built-in ``shapes`` world (DESIGN.md, "The built-in world: shapes").

A procedural image-text data set that needs no download: a light canvas with 1-3 coloured
circles, squares and triangles, a canonical caption listing them left to right, and short
questions asked only where the answer is unique. Seeded and deterministic; the train,
validation and test splits use disjoint seeds.

Coordinates: a bounding box is ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive, so the box
covers pixels ``x0 .. x1-1`` and its side is ``x1 - x0``; the centre is ``((x0+x1)/2,
(y0+y1)/2)`` in continuous image coordinates (pixel ``i`` covers ``[i, i+1)``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 200, 30),
    "purple": (140, 60, 190),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (10, 15), "large": (22, 28)}  # bbox side at 64 px
BASE_SIZE = 64
MIN_IMAGE_SIZE = 32  # smaller images leave no room for the objects and their gaps
JITTER = 15  # per channel, each way
BACKGROUND = (200, 255)  # each channel uniform in this range
MAX_OBJECTS = 3
MIN_GAP = 2  # px between bounding boxes at 64 px
MIN_DX = 2  # px between centre x's at 64 px, so "left to right" is never a tie
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
QTYPES = ("count", "exists", "color", "shape", "size", "count_color")
TASK_KINDS = ("caption", "vqa", "chat", "two_image")  # task_mix keys: records of each kind per image

SPLITS = {"train": 0, "validation": 1, "test": 2}
_INDEX_BITS = 40  # scene seeds: ((seed * 3 + split) << 40) + index, disjoint for index < 2**40


@dataclass(frozen=True, slots=True)
class ShapeObject:
    shape: str  # circle | square | triangle
    color: str  # palette name
    size: str  # small | large
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    rgb: tuple[int, int, int]  # the jittered fill colour

    @property
    def side(self) -> int:
        return self.bbox[2] - self.bbox[0]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True, slots=True)
class ShapesScene:
    image_size: int
    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]  # sorted left to right by centre x


def size_range(size: str, image_size: int = BASE_SIZE) -> tuple[int, int]:
    """Bounding-box side range (inclusive) of a size class at this canvas size."""
    lo, hi = SIZES[size]
    s = image_size / BASE_SIZE
    return max(3, round(lo * s)), max(3, round(hi * s))


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    """The integer seed of image ``index`` of ``split``; distinct for every (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {list(SPLITS)}")
    if not 0 <= index < 1 << _INDEX_BITS or seed < 0:
        raise ValueError(f"shapes index must be in [0, 2**{_INDEX_BITS}) and seed >= 0, got {index}, {seed}")
    return ((seed * len(SPLITS) + SPLITS[split]) << _INDEX_BITS) + index


def scene_rng(split: str, index: int, seed: int = 0) -> random.Random:
    """The generator of image ``index``: seeded through SHA-512 of the scene seed as text.

    (``random.Random(int)`` is not used directly: Mersenne Twister's init_by_array makes some
    distinct integers give the same stream, e.g. 257 and 2**40 + 257.)
    """
    return random.Random(f"shapes:{scene_seed(split, index, seed)}")


def _place(rng: random.Random, sides: list[int], image_size: int, gap: int, min_dx: int, tries: int = 30):
    """Random non-overlapping top-left corners for boxes of these sides, or None."""
    boxes: list[tuple[int, int, int, int]] = []
    rand = rng.random  # uniform corners; int(random() * n) is a few times faster than randint
    for d in sides:
        n = image_size - d + 1
        for _ in range(tries):
            x0, y0 = int(rand() * n), int(rand() * n)
            x1, y1 = x0 + d, y0 + d
            cx2 = x0 + x1  # twice the centre x
            if all(
                max(bx0 - x1, x0 - bx1, by0 - y1, y0 - by1) >= gap and abs(cx2 - bx0 - bx1) >= 2 * min_dx
                for bx0, by0, bx1, by1 in boxes
            ):
                boxes.append((x0, y0, x1, y1))
                break
        else:
            return None
    return boxes


def sample_scene(rng: random.Random | int, image_size: int = BASE_SIZE, max_objects: int = MAX_OBJECTS) -> ShapesScene:
    """Sample a scene: background, then 1-``max_objects`` objects with uniform shape, colour and size."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"shapes image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    s = image_size / BASE_SIZE
    gap, min_dx = max(MIN_GAP, round(MIN_GAP * s)), max(MIN_DX, round(MIN_DX * s))
    background = (rng.randint(*BACKGROUND), rng.randint(*BACKGROUND), rng.randint(*BACKGROUND))
    n = rng.randint(1, max_objects)
    while True:
        attrs = [(rng.choice(SHAPES), rng.choice(COLORS), rng.choice(("small", "large"))) for _ in range(n)]
        sides = [rng.randint(*size_range(size, image_size)) for _, _, size in attrs]
        for _ in range(50):  # placements for these attributes; a miss is rare (three large objects)
            boxes = _place(rng, sides, image_size, gap, min_dx)
            if boxes is not None:
                break
        else:
            continue
        objects = []
        for (shape, color, size), box in zip(attrs, boxes):
            rgb = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in PALETTE[color])
            objects.append(ShapeObject(shape, color, size, box, rgb))
        objects.sort(key=lambda o: o.bbox[0] + o.bbox[2])
        return ShapesScene(image_size, background, tuple(objects))


def render(scene: ShapesScene) -> Image.Image:
    """Draw the scene with PIL (no anti-aliasing: every object pixel is exactly its rgb)."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=o.rgb)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=o.rgb)
        else:  # isosceles triangle, apex up, base on the box's bottom row
            draw.polygon(((x0 + (x1 - 1 - x0) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)), fill=o.rgb)
    return img


def caption(scene: ShapesScene) -> str:
    """Canonical caption: objects left to right, "a, b and c"."""
    phrases = [o.phrase for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def hard_negatives(scene: ShapesScene, rng: random.Random, k: int) -> list[str]:
    """Up to ``k`` distinct false captions of ``scene``, each one edit away from the truth (NegCLIP-style
    hard negatives): one object's shape, colour or size changed; with 2+ objects also two objects'
    places swapped (wrong left-to-right order) or two objects' shapes / colours swapped (wrong binding)."""
    out: list[str] = []
    true = caption(scene)
    objs = scene.objects
    kinds = ("change", "change", "change") + (("order", "bind") if len(objs) > 1 else ())
    options = {"shape": SHAPES, "color": COLORS, "size": tuple(SIZES)}
    for _ in range(20 * k):
        if len(out) >= k:
            break
        kind = rng.choice(kinds)
        new = list(objs)
        if kind == "change":
            j, attr = rng.randrange(len(objs)), rng.choice(tuple(options))
            new[j] = replace(objs[j], **{attr: rng.choice([v for v in options[attr] if v != getattr(objs[j], attr)])})
        else:
            i, j = rng.sample(range(len(objs)), 2)
            if kind == "order":
                new[i], new[j] = objs[j], objs[i]
            else:
                attr = rng.choice(("shape", "color"))
                new[i] = replace(objs[i], **{attr: getattr(objs[j], attr)})
                new[j] = replace(objs[j], **{attr: getattr(objs[i], attr)})
        neg = caption(replace(scene, objects=tuple(new)))
        if neg != true and neg not in out:
            out.append(neg)
    return out


def questions(scene: ShapesScene) -> list[tuple[str, str, str]]:
    """Every question whose answer is unique, as ``(qtype, question, answer)``.

    - count: "how many objects are there?" (always)
    - exists: "is there a {shape}?" yes/no (always, for each shape)
    - color: "what color is the {shape}?" when exactly one object has that shape
    - shape: "what shape is the {color} object?" when exactly one object has that colour
    - size: "what size is the {shape}?" when exactly one object has that shape
    - count_color: "how many {color} objects are there?" for each colour present
      (absent colours are not asked: "zero" is not an answer word of the world; "is there"
      covers absence)
    """
    objs = scene.objects
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    qs = [("count", "how many objects are there?", COUNT_WORDS[len(objs)])]
    qs += [("exists", f"is there a {s}?", "yes" if shapes[s] else "no") for s in SHAPES]
    unique_shape = {o.shape: o for o in objs if shapes[o.shape] == 1}
    unique_color = {o.color: o for o in objs if colors[o.color] == 1}
    qs += [("color", f"what color is the {s}?", o.color) for s, o in unique_shape.items()]
    qs += [("shape", f"what shape is the {c} object?", o.shape) for c, o in unique_color.items()]
    qs += [("size", f"what size is the {s}?", o.size) for s, o in unique_shape.items()]
    qs += [("count_color", f"how many {c} objects are there?", COUNT_WORDS[n]) for c, n in colors.items()]
    return qs


ATTRIBUTES = ("color", "shape", "size")


def _naming_questions(scene: ShapesScene) -> list[tuple[str, str, ShapeObject]]:
    """Questions that name one object (its shape or colour is unique): (attribute asked, question, object)."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    out = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            out += [("color", f"what color is the {o.shape}?", o), ("size", f"what size is the {o.shape}?", o)]
        if colors[o.color] == 1:
            out.append(("shape", f"what shape is the {o.color} object?", o))
    return out


def conversation(scene: ShapesScene, rng: random.Random, followups: int = 2) -> list[tuple[str, str, str]] | None:
    """A conversation about one image (DESIGN.md, Conversations), as ``(qtype, question, answer)`` turns: a
    question that names an object, then ``followups`` questions about it with "it" (qtype ``followup``),
    another question of the list sometimes between them (a naming one makes its object the new referent).
    None when no object can be named."""
    naming = _naming_questions(scene)
    if not naming:
        return None
    attr, q, obj = rng.choice(naming)
    turns = [(attr, q, getattr(obj, attr))]
    told = {attr}
    others = [t for t in questions(scene) if t[0] in ("count", "exists", "count_color")]
    interjected = False
    for _ in range(followups):
        if not interjected and rng.random() < 0.3:  # one interjection at most: a plain question, or one that
            interjected = True  # names another object
            if rng.random() < 0.5:
                a2, q2, o2 = rng.choice(naming)
                turns.append((a2, q2, getattr(o2, a2)))
                if o2 is not obj:
                    obj, told = o2, set()
                told.add(a2)
            else:
                turns.append(rng.choice(others))
        left = [a for a in ATTRIBUTES if a not in told] or list(ATTRIBUTES)
        a = rng.choice(left)
        told.add(a)
        turns.append(("followup", f"what {a} is it?", getattr(obj, a)))
    return turns


def two_image_question(first: ShapesScene, second: ShapesScene, rng: random.Random) -> tuple[str, str, str]:
    """One question about two images (DESIGN.md, Two images): ``(qtype, question, answer)``, qtype one of
    ``which_image`` ("the first" / "the second", asked only when exactly one image has it), ``both`` (yes /
    no) and ``total`` (objects in both)."""
    def has(scene, color, shape):
        return any(o.shape == shape and (color is None or o.color == color) for o in scene.objects)

    kind = rng.choice(("which_image", "which_image", "both", "total"))
    if kind == "which_image":
        options = []
        for shape in SHAPES:
            for color in (None, *COLORS):
                a, b = has(first, color, shape), has(second, color, shape)
                if a != b:
                    options.append((color, shape, "the first" if a else "the second"))
        if options:
            color, shape, answer = rng.choice(options)
            thing = f"{color} {shape}" if color else shape
            return "which_image", f"which image has a {thing}?", answer
        kind = "both"
    if kind == "both":
        shape = rng.choice(SHAPES)
        yes = has(first, None, shape) and has(second, None, shape)
        return "both", f"do both images have a {shape}?", "yes" if yes else "no"
    return "total", "how many objects are there in total?", COUNT_WORDS[len(first.objects) + len(second.objects)]


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
