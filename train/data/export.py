"""Write the shapes world to disk as an imagefolder (PNGs + ``metadata.jsonl``).

The folder reads back with ``build_source({"format": "imagefolder", "path": out_dir})`` and
with ``datasets.load_dataset("imagefolder", data_dir=out_dir)``. Every line has the same
keys (``file_name``, ``task``, ``caption``, ``question``, ``answer``, ``qtype``,
``image_id``; the unused ones null), so Arrow infers one schema for the whole file.

Writing into a folder written before replaces it: ``metadata.jsonl`` is rewritten, and the images
the old one listed that the new one does not (an earlier, larger run's ``00000.png`` ...) are
removed, so the folder never holds stale images. Files it did not list are left alone.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

from train.data.shapes import MIN_IMAGE_SIZE, ShapesDataset

IMAGE_NAME = re.compile(r"\d{5,}\.png")  # the names this module writes: 00000.png ...


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
    ``ShapesDataset(task_mix=task_mix)`` draws for it (the training mix). Images of an earlier
    run beyond ``n`` are removed (see the module docstring). ``ValueError`` for ``n < 1`` or
    ``image_size < 32``, ``NotADirectoryError`` when ``out_dir`` is a file, ``OSError`` when it
    cannot be written.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of images must be at least 1, got {n!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size!r}")
    ds = ShapesDataset(split, n, image_size, task_mix, seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(out))
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    names = {f"{i:0{width}d}.png" for i in range(n)}
    meta = out / "metadata.jsonl"
    earlier = set()  # the images an earlier run wrote here, by its metadata
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                earlier.add(str(json.loads(line)["file_name"]))
            except (ValueError, KeyError, TypeError):
                continue
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
    for name in earlier - names:  # images of an earlier, larger run: metadata.jsonl no longer lists them
        stale = out / name
        if IMAGE_NAME.fullmatch(name) and stale.is_file():
            stale.unlink()
    return meta
