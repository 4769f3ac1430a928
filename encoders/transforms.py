"""Image preprocessing: an RGB ``PIL.Image`` in, a normalized float tensor (3, S, S) out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2


def build_image_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    scale: tuple[float, float] = (0.8, 1.0),
    hflip: bool = False,
) -> Callable:
    """Return the preprocessing for an encoder that takes ``image_size`` x ``image_size`` inputs.

    Eval: resize the shorter side to ``image_size`` (bicubic, antialiased), centre crop.
    Train: random resized crop covering ``scale`` of the area with a near-square aspect ratio,
    and a horizontal flip only when ``hflip`` (off by default: captions say "left" and "right").
    Both end with float32 in [0, 1] and ``(x - mean) / std`` per channel.
    """
    bicubic = v2.InterpolationMode.BICUBIC
    if train:
        geometry = [
            v2.RandomResizedCrop(
                image_size, scale=scale, ratio=(0.9, 1.1), interpolation=bicubic, antialias=True
            )
        ]
        if hflip:
            geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = [
            v2.Resize(image_size, interpolation=bicubic, antialias=True),
            v2.CenterCrop(image_size),
        ]
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),  # PIL (H, W, 3) uint8 -> tensor (3, H, W) uint8
            v2.ToDtype(torch.float32, scale=True),  # uint8 -> float32 in [0, 1]
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),  # tv_tensors.Image -> plain torch.Tensor
        ]
    )
