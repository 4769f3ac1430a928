"""Finding the images of a folder and reading them in data-loader workers: bytes, content hash and
pixels in one read of each file."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from encoders import ImageLoadError, load_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class FileStat:
    path: str  # relative to the root, '/'-separated
    size: int
    mtime_ns: int


def walk(root: Path, skip: Path | None = None) -> list[FileStat]:
    """Every file with an image suffix under ``root`` (recursively, symlinked folders not followed), in
    path order; ``skip``: a folder left out (the index itself, when it lies inside ``root``)."""
    root = Path(root)
    skip = skip.resolve() if skip is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and here.resolve() == skip:
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            full = here / name
            try:
                st = full.stat()
            except OSError:  # vanished or a dangling link: not an image we can index
                continue
            found.append(FileStat(full.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return found


class ImageFiles(Dataset):
    """Item i: ``{"path", "sha256", "size", "mtime_ns", "pixels" (3, S, S) or None, "error" str or None}``.

    Size and mtime are read from the open file, so they describe the bytes that were hashed."""

    def __init__(self, root: Path, paths: list[str], processor, max_pixels: int | None = None):
        self.root, self.paths, self.processor, self.max_pixels = Path(root), paths, processor, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        rel = self.paths[i]
        item = {"path": rel, "sha256": None, "size": 0, "mtime_ns": 0, "pixels": None, "error": None}
        try:
            with open(self.root / rel, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as err:
            item["error"] = err.strerror or type(err).__name__
            return item
        item.update(sha256=hashlib.sha256(data).hexdigest(), size=st.st_size, mtime_ns=st.st_mtime_ns)
        try:
            image = load_image(io.BytesIO(data), **({"max_pixels": self.max_pixels} if self.max_pixels else {}))
            item["pixels"] = self.processor.pixel_values([image])[0]  # (3, S, S)
        except ImageLoadError as err:
            item["error"] = err.cause
        return item


def collate(items: list[dict]) -> list[dict]:
    """Keep the items as they are (pixels are stacked later, for the good ones only)."""
    return items


def stack(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["pixels"] for it in items])  # (B, 3, S, S)
