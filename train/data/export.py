"""Write the shapes world to disk as an imagefolder (PNGs + ``metadata.jsonl``).

The folder reads back with ``build_source({"format": "imagefolder", "path": out_dir})`` and
with ``datasets.load_dataset("imagefolder", data_dir=out_dir)``. Every line has the same
keys (``file_name``, ``task``, ``caption``, ``question``, ``answer``, ``qtype``,
``image_id``; the unused ones null), so Arrow infers one schema for the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.data.shapes import ShapesDataset


def write_shapes_imagefolder(
    out_dir: str | Path,
    n: int,
    split: str = "train",
    image_size: int = 64,
    seed: int = 0,
    task_mix: dict[str, int] | None = None,
) -> Path:
    """Render images ``0 .. n-1`` of a shapes split into ``out_dir``; return the metadata path.

    Each image gets one metadata line per record: with ``task_mix=None`` its caption and every
    valid question (``records_for_image``, the evaluation set), else the records
    ``ShapesDataset(task_mix=task_mix)`` draws for it (the training mix).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(split, max(n, 1), image_size, task_mix, seed)
    width = max(5, len(str(n - 1)))
    meta = out / "metadata.jsonl"
    with open(meta, "w", encoding="utf-8") as f:
        for i in range(n):
            records = ds.records_for_image(i) if task_mix is None else ds.group(i)
            name = f"{i:0{width}d}.png"
            records[0]["image"].save(out / name)
            for r in records:
                vqa = r["task"] == "vqa"
                row = {
                    "file_name": name,
                    "task": r["task"],
                    "caption": None if vqa else r["target"],
                    "question": r["prompt"] if vqa else None,
                    "answer": r["target"] if vqa else None,
                    "qtype": r.get("qtype"),
                    "image_id": r["image_id"],
                }
                f.write(json.dumps(row) + "\n")
    return meta
