"""Zero-shot classification on the shapes world: top-1 accuracy for shape, colour and size on images of
one object, with `VisionLanguagePipeline.classify` (no training on labels: the captions' embeddings do it).

Two prompt sets per attribute: the label alone (``"circle"``), and the ensemble of every caption that
names the label, the other attributes running over all their values (``"a {size} {color} circle"``,
10 prompts per shape) and averaged, which is CLIP's prompt ensembling with the captions this world uses.

    mmgpt eval MODEL --data shapes:test:300 --task classify
"""

from __future__ import annotations

from itertools import product

from PIL import Image

from train.data.shapes import COLORS, SHAPES, SIZES, ShapeObject, render, sample_scene, scene_rng

ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "size": tuple(SIZES)}


def single_object_images(n: int, split: str = "test", image_size: int = 64, seed: int = 0
                         ) -> list[tuple[Image.Image, ShapeObject]]:
    """``n`` one-object scenes of ``split`` (deterministic: scene ``i`` is seeded by (seed, split, i))."""
    out = []
    for i in range(n):
        scene = sample_scene(scene_rng(split, i, seed), image_size, max_objects=1)
        out.append((render(scene), scene.objects[0]))
    return out


def ensemble_templates(attribute: str) -> list[str]:
    """Captions of one object with ``{}`` where ``attribute``'s value goes: 'a {size} {color} {}' ..."""
    slots = {"size": list(SIZES), "color": list(COLORS), "shape": list(SHAPES)}
    slots[attribute] = ["{}"]
    return [f"a {size} {color} {shape}" for size, color, shape in product(slots["size"], slots["color"],
                                                                          slots["shape"])]


def classify_eval(pipeline, n: int = 300, split: str = "test", seed: int = 0, batch_size: int = 64) -> dict:
    """-> ``{"classify_{attr}_top1": ..., "classify_{attr}_top1_label_only": ..., "num_images": n}``."""
    data = single_object_images(n, split, pipeline.processor.image_size, seed)
    images = [im for im, _ in data]
    metrics: dict = {}
    for attr, labels in ATTRIBUTES.items():
        truth = [getattr(obj, attr) for _, obj in data]
        for suffix, templates in (("", ensemble_templates(attr)), ("_label_only", None)):
            ranked = pipeline.classify(images, list(labels), templates=templates, batch_size=batch_size)
            hits = sum(r[0]["label"] == t for r, t in zip(ranked, truth))
            metrics[f"classify_{attr}_top1{suffix}"] = hits / max(n, 1)
    metrics["num_images"] = n
    return metrics


def run_classify_eval(args) -> int:
    """`mmgpt eval MODEL --data shapes[:SPLIT[:N]] --task classify [--max-images N] [--json]`."""
    import json

    from mmgpt.cli import UserError, load_model
    from train.data import parse_source

    try:
        spec = parse_source(args.data)
    except ValueError as err:
        raise UserError(f"--data: {err}") from None
    if spec.get("format") != "shapes":
        raise UserError(f"--data: --task classify reads the shapes world (e.g. shapes:test:300), not {args.data}")
    n = args.max_images or spec.get("size") or 300
    vl = load_model(args.model, device=args.device)
    metrics = classify_eval(vl, n=n, split=spec.get("split", "test"), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(metrics), flush=True)
    else:
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0
