"""The ``shapes`` world itself (DESIGN.md, "The built-in world: shapes"): scenes, drawing and text.

A light canvas with 1-3 coloured circles, squares and triangles (:func:`sample_scene`, drawn by
:func:`render`), its canonical caption listing them left to right (:func:`caption`, and
one-edit false captions in :func:`hard_negatives`), short questions asked only where the answer
is unique (:func:`questions`), conversations about one named object (:func:`conversation`) and
questions about two images (:func:`two_image_question`). Seeded and deterministic; the train,
validation and test splits use disjoint seeds (:func:`scene_seed`, :func:`scene_rng`).

Coordinates: a bounding box is ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive, so the box
covers pixels ``x0 .. x1-1`` and its side is ``x1 - x0``; the centre is ``((x0+x1)/2,
(y0+y1)/2)`` in continuous image coordinates (pixel ``i`` covers ``[i, i+1)``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "BACKGROUND",
    "BASE_SIZE",
    "COLORS",
    "COUNT_WORDS",
    "JITTER",
    "MAX_OBJECTS",
    "MIN_DX",
    "MIN_GAP",
    "MIN_IMAGE_SIZE",
    "PALETTE",
    "QTYPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "ShapeObject",
    "ShapesScene",
    "caption",
    "conversation",
    "hard_negatives",
    "questions",
    "render",
    "sample_scene",
    "scene_rng",
    "scene_seed",
    "size_range",
    "two_image_question",
]

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
