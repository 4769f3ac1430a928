"""Load any image a user or a data set hands us into a fully decoded RGB ``PIL.Image``.

Every failure becomes one exception type, :class:`ImageLoadError`, whose message starts with the
file name and says why (``"photo.jpg: truncated or corrupt image (...)"``), so a data loader can
skip a bad record and count its reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own default limit (Image.MAX_IMAGE_PIXELS), kept as our default.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class ImageLoadError(ValueError):
    """An image could not be loaded; ``str(err)`` is ``"<name>: <cause>"``."""

    def __init__(self, name: str, cause: str):
        super().__init__(f"{name}: {cause}")
        self.name = name
        self.cause = cause


def load_image(src: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``src`` as a fully decoded RGB image with its EXIF orientation applied.

    ``src`` is a path, raw bytes, a binary file object, a PIL image, or pixels in memory (a numpy
    array (H, W[, 3|4]) or a torch tensor (3, H, W); uint8, or floats in [0, 1]). Images with more than
    ``max_pixels`` pixels are refused before their pixels are decoded (``None``: no limit of ours;
    Pillow's hard ceiling of ``2 * Image.MAX_IMAGE_PIXELS`` still applies).
    """
    name = _describe(src)
    if isinstance(src, Image.Image):
        with _strict_truncation():
            return _decode(src, name, max_pixels)
    if is_array(src):
        return _decode(_array_image(src, name), name, max_pixels)

    fp = _open_source(src, name)
    try:
        with _strict_truncation(), Image.open(fp) as im:
            return _decode(im, name, max_pixels)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(name, "not an image") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, f"image too large ({e})") from e
    except FileNotFoundError as e:
        raise ImageLoadError(name, "file not found") from e
    except PermissionError as e:
        raise ImageLoadError(name, "permission denied") from e
    except Exception as e:  # any failure while parsing the file means a bad image
        raise ImageLoadError(name, f"truncated or corrupt image ({type(e).__name__}: {e})") from e
    finally:
        if fp is not src and not isinstance(fp, str):
            fp.close()


def is_array(x) -> bool:
    """A numpy array or a torch tensor (pixels in memory), as opposed to a path, bytes or a file."""
    return isinstance(x, np.ndarray) or type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _array_image(src, name: str) -> Image.Image:
    """Pixels in memory -> PIL image. numpy: (H, W), (H, W, 3) or (H, W, 4), as PIL and OpenCV lay them out
    (a (3, H, W) array is read channels-first); torch: (3, H, W) or (1 or 4, H, W), as torchvision does.
    uint8 0-255, or floats / bools in [0, 1]."""
    torch_like = not isinstance(src, np.ndarray)
    if torch_like:
        src = src.detach().cpu()
        arr = (src.float() if src.is_floating_point() else src).numpy()  # numpy has no bfloat16
    else:
        arr = src
    shape = tuple(arr.shape)
    if arr.ndim == 3 and (torch_like or (shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4))):
        arr = arr.transpose(1, 2, 0)  # channels first -> last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or arr.size == 0:
        layout = "(3, H, W)" if torch_like else "(H, W), (H, W, 3) or (H, W, 4)"
        raise ImageLoadError(name, f"an array of shape {shape} is not one image; give {layout}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageLoadError(name, "float pixels must lie in [0, 1] (uint8 pixels in 0-255)")
        arr = np.rint(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageLoadError(name, f"pixels of type {arr.dtype}: give uint8 (0-255) or floats in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(arr))


def _describe(src: ImageSource) -> str:
    """The name error messages start with."""
    if is_array(src):
        return f"<{'array' if isinstance(src, np.ndarray) else 'tensor'} {tuple(src.shape)}>"
    if isinstance(src, str | os.PathLike):
        return os.fspath(src)
    if isinstance(src, bytes | bytearray | memoryview):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else "<file>"


def _open_source(src: ImageSource, name: str) -> str | BinaryIO:
    """Check the cheap failures (missing, directory, empty) and return what ``Image.open`` reads."""
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        if path.is_dir():
            raise ImageLoadError(name, "is a directory, not an image file")
        if not path.exists():
            raise ImageLoadError(name, "file not found")
        if path.stat().st_size == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        return os.fspath(path)

    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        return io.BytesIO(bytes(src))

    if not hasattr(src, "read"):
        raise TypeError(f"load_image: unsupported source type {type(src).__name__}")
    if not (hasattr(src, "seekable") and src.seekable()):
        # Image.open needs to seek: buffer a stream (socket, pipe, tar member) in memory.
        return _open_source(src.read(), name)
    start = src.tell()
    remaining = src.seek(0, io.SEEK_END) - start
    src.seek(start)
    if remaining == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return src


def _decode(im: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    """Size check (header only), full decode, EXIF rotation, conversion to RGB."""
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            name, f"image too large: {width} x {height} = {width * height} pixels > {max_pixels}"
        )
    try:
        im.load()  # full decode: a truncated file fails here, not later in a worker
    except Exception as e:
        raise ImageLoadError(name, f"truncated or corrupt image ({type(e).__name__}: {e})") from e
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose a readable image
        im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to RGB; transparency is composited on white."""
    if im.mode in _HIGH_BIT_MODES:
        im = _high_bit_to_l(im)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA") if im.mode != "La" else im.convert("LA").convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float image linearly onto 8-bit grey (mode L), never clipping.

    I;16*: the full 0..65535 range maps to 0..255. I (ambiguous depth): values in 0..255 are kept,
    values in 0..65535 are treated as 16-bit, anything else is stretched from its min..max.
    F: values in 0..1 are scaled by 255, values in 0..255 kept, anything else stretched.
    """
    if im.mode.startswith("I;16"):
        im, low, high = im.convert("I"), 0.0, 65535.0
    else:
        low, high = im.getextrema()
        full_scale = 1.0 if im.mode == "F" else 255.0
        if low >= 0 and high <= full_scale:
            low, high = 0.0, full_scale
        elif low >= 0 and high <= 255:
            low, high = 0.0, 255.0
        elif im.mode == "I" and low >= 0 and high <= 65535:
            low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    # point() with a linear lambda is applied in C for modes I and F.
    return im.point(lambda v: (v - low) * scale + 0.5).convert("L")


# --- ImageFile.LOAD_TRUNCATED_IMAGES ----------------------------------------------------------
# Some libraries set this Pillow global to True, after which a truncated file decodes to a grey
# band instead of raising. We switch it off while any load_image call runs (reference-counted,
# so concurrent threads do not restore it under each other) and put the old value back after.

_truncation_lock = threading.Lock()
_truncation_depth = 0
_truncation_saved = False


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    global _truncation_depth, _truncation_saved
    with _truncation_lock:
        if _truncation_depth == 0:
            _truncation_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _truncation_depth += 1
    try:
        yield
    finally:
        with _truncation_lock:
            _truncation_depth -= 1
            if _truncation_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _truncation_saved
