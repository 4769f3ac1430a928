"""The shapes world: deterministic, disjoint splits, and every caption and answer true to the pixels.

The pixel checks do not trust the scene objects: they find each object's pixels in the image,
measure its box, classify its shape from the fill ratio and its colour from the nearest
palette entry, then rebuild the caption and the set of answerable questions independently.
"""

import hashlib
import itertools
import re
import time

import numpy as np
import pytest

from train.data import ShapesDataset, build_source, write_shapes_imagefolder
from train.data.shapes import PALETTE, SIZES, caption, questions, render, sample_scene, scene_rng, scene_seed

COUNT = {1: "one", 2: "two", 3: "three"}


def _digest(img) -> str:
    return hashlib.md5(img.tobytes()).hexdigest()


def test_deterministic():
    a, b = ShapesDataset("train", 50), ShapesDataset("train", 50)
    for i in (0, 7, 49):
        ra, rb = a.group(i), b.group(i)
        assert [(r["task"], r["prompt"], r["target"]) for r in ra] == [
            (r["task"], r["prompt"], r["target"]) for r in rb
        ]
        assert _digest(ra[0]["image"]) == _digest(rb[0]["image"])
        assert a[2 * i]["target"] == ra[0]["target"]  # map-style index: image i, caption first
    assert _digest(a.group(0)[0]["image"]) != _digest(a.group(1)[0]["image"])
    assert _digest(a.group(0)[0]["image"]) != _digest(ShapesDataset("train", 1, seed=1).group(0)[0]["image"])
    # Golden captions: the world must not drift silently (it would change every split).
    assert [caption(a.scene(i)[0]) for i in range(3)] == [
        "a small red circle and a small blue triangle",
        "a large purple triangle",
        "a large blue triangle and a small red circle",
    ]


def test_splits_disjoint():
    n = 2000
    digests = {
        s: {_digest(render(ShapesDataset(s, n).scene(i)[0])) for i in range(n)}
        for s in ("train", "validation", "test")
    }
    for s, t in itertools.combinations(digests, 2):
        assert not digests[s] & digests[t], (s, t)
    assert all(len(d) > 0.99 * n for d in digests.values())
    seeds = {s: {scene_seed(s, i) for i in range(n)} | {scene_seed(s, 2**40 - 1)} for s in digests}
    for s, t in itertools.combinations(seeds, 2):
        assert not seeds[s] & seeds[t]
    # Random(257) and Random(2**40 + 257) give the same stream; scene_rng must not.
    assert scene_rng("train", 257).random() != scene_rng("validation", 257).random()
    assert scene_seed("train", 5, seed=1) not in seeds["train"] | seeds["validation"] | seeds["test"]
    with pytest.raises(ValueError, match="split"):
        scene_seed("dev", 0)


def _measure(arr: np.ndarray, obj):
    """Pixel facts of one object: exact-colour mask inside its box -> box, fill, shape, colour."""
    x0, y0, x1, y1 = obj.bbox
    mask = np.all(arr == np.array(obj.rgb, dtype=np.uint8), axis=-1)
    ys, xs = np.nonzero(mask[y0:y1, x0:x1])
    box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
    w, h = box[2] - box[0], box[3] - box[1]
    fill = len(xs) / (w * h)
    shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    # colour read where the object surely is: the centre, or 2/3 down a triangle
    cx = (box[0] + box[2]) / 2
    y = box[1] + (2 * h / 3 if shape == "triangle" else h / 2)
    pixel = arr[int(y), int(cx)].astype(int)
    dist = {c: np.abs(pixel - np.array(rgb)).max() for c, rgb in PALETTE.items()}
    color = min(dist, key=dist.get)
    return {
        "box": box,
        "side": w,
        "height": h,
        "fill": fill,
        "shape": shape,
        "color": color,
        "dist": dist,
        "cx": cx,
        "mask": mask,
        "rows": mask[box[1] : box[3], box[0] : box[2]].sum(1),
    }


def _expected_questions(objs):
    """The answerable questions, rebuilt from measured attributes."""
    qs = {("count", "how many objects are there?", COUNT[len(objs)])}
    for s in ("circle", "square", "triangle"):
        with_s = [o for o in objs if o["shape"] == s]
        qs.add(("exists", f"is there a {s}?", "yes" if with_s else "no"))
        if len(with_s) == 1:
            qs.add(("color", f"what color is the {s}?", with_s[0]["color"]))
            qs.add(("size", f"what size is the {s}?", with_s[0]["size"]))
    for c in PALETTE:
        with_c = [o for o in objs if o["color"] == c]
        if len(with_c) == 1:
            qs.add(("shape", f"what shape is the {c} object?", with_c[0]["shape"]))
        if with_c:
            qs.add(("count_color", f"how many {c} objects are there?", COUNT[len(with_c)]))
    return qs


PHRASE = r"a (small|large) (red|green|blue|yellow|purple) (circle|square|triangle)"
GRAMMAR = {
    1: re.compile(f"^{PHRASE}$"),
    2: re.compile(f"^{PHRASE} and {PHRASE}$"),
    3: re.compile(f"^{PHRASE}, {PHRASE} and {PHRASE}$"),
}


@pytest.mark.parametrize(
    ("image_size", "options"), [(64, {}), (96, {}), (64, {"shape_pairs": True, "single_object_first": 60})]
)
def test_captions_and_answers_match_pixels(image_size, options):
    ds = ShapesDataset("validation", 500, image_size=image_size, **options)
    counts = {1: 0, 2: 0, 3: 0}
    scale = image_size / 64
    for i in range(ds.size):
        scene, _ = ds.scene(i)
        arr = np.asarray(render(scene))
        assert arr.shape == (image_size, image_size, 3)
        bg = np.array(scene.background)
        assert ((200 <= bg) & (bg <= 255)).all()
        objs = [_measure(arr, o) for o in scene.objects]
        assert 1 <= len(objs) <= 3
        counts[len(objs)] += 1
        covered = np.zeros(arr.shape[:2], bool)
        for o, m in zip(scene.objects, objs):
            assert m["box"] == o.bbox, "drawn pixels fill exactly the declared box"
            assert 0 <= o.bbox[0] and o.bbox[2] <= image_size and 0 <= o.bbox[1] and o.bbox[3] <= image_size
            assert m["side"] == m["height"]
            lo, hi = SIZES[o.size]
            assert round(lo * scale) <= m["side"] <= round(hi * scale)
            m["size"] = "small" if m["side"] < round(18 * scale) else "large"
            assert m["shape"] == o.shape, (i, m["fill"])
            if o.shape == "triangle":  # apex up: a narrow top row, a full bottom row
                assert m["rows"][0] <= 3 and m["rows"][-1] == m["side"]
            assert m["dist"][m["color"]] <= 16, "within the jitter of its palette colour"
            assert m["color"] == o.color
            covered[o.bbox[1] : o.bbox[3], o.bbox[0] : o.bbox[2]] = True
        assert (arr[~covered] == bg).all(), "nothing drawn outside the boxes"
        for a, b in itertools.combinations(scene.objects, 2):
            gap = max(
                b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2], b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3]
            )
            assert gap >= 2
        # caption: grammar for its count, objects left to right by measured centre
        cap = caption(scene)
        match = GRAMMAR[len(objs)].match(cap)
        assert match, cap
        words = match.groups()
        ordered = sorted(objs, key=lambda m: m["cx"])
        assert len({m["cx"] for m in objs}) == len(objs), "no tie in left-to-right order"
        assert [tuple(words[k : k + 3]) for k in range(0, len(words), 3)] == [
            (m["size"], m["color"], m["shape"]) for m in ordered
        ]
        # questions: exactly the answerable ones, with the pixels' answers
        qs = questions(scene)
        assert len(qs) == len(set(qs))
        assert set(qs) == _expected_questions(objs), i
    assert min(counts.values()) > 50, counts


def test_dataset_records():
    ds = ShapesDataset("train", 30, task_mix={"caption": 1, "vqa": 3})
    assert len(ds) == 30 * 4
    seen_qtypes = set()
    for i in range(30):
        group = ds.group(i)
        assert [r["task"] for r in group] == ["caption", "vqa", "vqa", "vqa"]
        assert len({r["prompt"] for r in group}) == 4, "no repeated question"
        assert all(r["image"] is group[0]["image"] for r in group)
        allq = {(r["qtype"], r["prompt"], r["target"]) for r in ds.records_for_image(i)[1:]}
        assert {(r["qtype"], r["prompt"], r["target"]) for r in group[1:]} <= allq
        assert [ds[4 * i + k]["prompt"] for k in range(4)] == [r["prompt"] for r in group]
        seen_qtypes |= {r["qtype"] for r in group[1:]}
        full = ds.records_for_image(i)
        assert full[0]["task"] == "caption" and full[0]["references"] == [full[0]["target"]]
        assert all(r["answers"] == [r["target"]] and r["image_id"] == f"shapes-train-0-{i}" for r in full[1:])
    assert seen_qtypes == {"count", "exists", "color", "shape", "size", "count_color"}
    grouped = ShapesDataset("train", 30, task_mix={"caption": 1, "vqa": 3}, grouped=True)
    assert len(grouped) == 30 and [r["prompt"] for r in grouped[3]] == [r["prompt"] for r in ds.group(3)]
    captions_only = build_source({"format": "shapes", "size": 5, "task_mix": {"caption": 1, "vqa": 0}})
    assert len(captions_only) == 5 and all(captions_only[i]["task"] == "caption" for i in range(5))
    with pytest.raises(ValueError):
        ShapesDataset("train", 5, task_mix={"captions": 1})


def test_export_imagefolder(tmp_path):
    meta = write_shapes_imagefolder(tmp_path / "shapes", 6, split="test")
    assert meta.name == "metadata.jsonl" and len(list(meta.parent.glob("*.png"))) == 6
    src = build_source(str(tmp_path / "shapes"))  # bare folder: inferred imagefolder
    ds = ShapesDataset("test", 6)
    expected = [r for i in range(6) for r in ds.records_for_image(i)]
    assert len(src) == len(expected)
    for k, want in enumerate(expected):
        got = src[k]
        for key in ("task", "prompt", "target", "image_id", "qtype"):
            assert got.get(key) == want.get(key)
        assert np.array_equal(np.asarray(got["image"]), np.asarray(want["image"]))


def test_throughput(capsys):
    n = 2000
    ds = ShapesDataset("train", n)
    t = time.perf_counter()
    for i in range(n):
        ds.group(i)
    rate = n / (time.perf_counter() - t)
    with capsys.disabled():
        print(f"\nshapes generation: {rate:.0f} images/s (64 px, caption + 1 question each)")
    sample_scene(0)  # an int seed works too


def test_single_object_curriculum():
    """`single_object_first=N`: images 0..N-1 hold one object, later ones the usual 1-3; read in order."""
    plain = ShapesDataset("train", 400)
    cur = ShapesDataset("train", 400, single_object_first=150)
    assert cur.ordered and not plain.ordered
    assert all(len(cur.scene(i)[0].objects) == 1 for i in range(150))
    later = [len(cur.scene(i)[0].objects) for i in range(150, 400)]
    assert set(later) == {1, 2, 3}
    assert [cur.scene(i)[0] for i in range(150, 160)] == [plain.scene(i)[0] for i in range(150, 160)]
    assert any(len(plain.scene(i)[0].objects) > 1 for i in range(150))
    one = cur.group(3)[0]
    assert " and " not in one["target"] and "," not in one["target"]
    src = build_source({"format": "shapes", "size": 20, "single_object_first": 5})
    assert src.ordered and len(src.scene(4)[0].objects) == 1
    with pytest.raises(ValueError, match="single_object_first"):
        ShapesDataset("train", 5, single_object_first=-1)
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(1, max_objects=4)


def test_shape_pairs():
    """`shape_pairs`: image 2k+1 is image 2k with exactly one object's shape changed; read in order."""
    plain, pairs = ShapesDataset("train", 200), ShapesDataset("train", 200, shape_pairs=True)
    assert pairs.ordered and not plain.ordered
    for k in range(0, 200, 2):
        a, b = pairs.scene(k)[0], pairs.scene(k + 1)[0]
        assert a == plain.scene(k)[0]
        assert a.background == b.background and len(a.objects) == len(b.objects)
        diff = [(o, p) for o, p in zip(a.objects, b.objects) if o != p]
        assert len(diff) == 1
        o, p = diff[0]
        assert o.shape != p.shape and (o.color, o.size, o.bbox, o.rgb) == (p.color, p.size, p.bbox, p.rgb)
        assert caption(a) != caption(b)
    assert pairs.scene(7)[0] == pairs.scene(7)[0], "deterministic"
    assert build_source({"format": "shapes", "size": 4, "shape_pairs": True}).shape_pairs


def test_hard_negatives():
    """`hard_negatives=K`: each caption record carries K distinct false captions, each one edit away from
    the truth (one object's shape / colour / size changed, two objects' places swapped, or two objects'
    shapes or colours swapped); scenes and questions are unchanged."""
    plain = ShapesDataset("train", 80, task_mix={"caption": 1, "vqa": 2}, grouped=True)
    hard = ShapesDataset("train", 80, task_mix={"caption": 1, "vqa": 2}, grouped=True, hard_negatives=3)

    def objects(text):
        found = re.findall(r"a (small|large) (\w+) (circle|square|triangle)", text)
        phrases = ["a " + " ".join(f) for f in found]
        assert text == (phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1])
        return found

    def edit(t, n):
        if len(t) != len(n) or t == n:
            return None
        diff = [i for i in range(len(t)) if t[i] != n[i]]
        if len(diff) == 1 and sum(a != b for a, b in zip(t[diff[0]], n[diff[0]])) == 1:
            return "change"
        if len(diff) == 2:
            i, j = diff
            if (n[i], n[j]) == (t[j], t[i]):
                return "order"
            changed = {a for a in range(3) if t[i][a] != n[i][a]} | {a for a in range(3) if t[j][a] != n[j][a]}
            if len(changed) == 1:
                (a,) = changed
                if (n[i][a], n[j][a]) == (t[j][a], t[i][a]):
                    return "bind"
        return None

    kinds = set()
    for i in range(80):
        a, b = plain[i], hard[i]
        assert [(r["task"], r["target"], r.get("prompt")) for r in a] == [(r["task"], r["target"], r.get("prompt"))
                                                                            for r in b]
        assert "negatives" not in a[0] and all("negatives" not in r for r in b[1:])
        negs = b[0]["negatives"]
        assert len(negs) == 3 and len(set(negs)) == 3 and b[0]["target"] not in negs
        for neg in negs:
            kind = edit(objects(b[0]["target"]), objects(neg))
            assert kind is not None, (b[0]["target"], neg)
            kinds.add(kind)
    assert kinds == {"change", "order", "bind"}
    again = ShapesDataset("train", 80, task_mix={"caption": 1, "vqa": 2}, grouped=True, hard_negatives=3)
    assert hard[5][0]["negatives"] == again[5][0]["negatives"], "deterministic"
    src = build_source({"format": "shapes", "size": 4, "hard_negatives": 2})
    assert src.hard_negatives == 2 and len(src[0]["negatives"]) == 2
    with pytest.raises(ValueError, match="hard_negatives"):
        ShapesDataset("train", 5, hard_negatives=-1)
