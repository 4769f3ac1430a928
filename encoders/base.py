"""The interface every image encoder backend implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EncoderOutput:
    patch_tokens: Tensor  # (B, N, D): every output token, CLS included where the backend has one
    pooled: Tensor  # (B, D): one vector per image, for the contrastive head


class VisionEncoder(nn.Module):
    """An image tower: pixel_values (B, 3, H, W) -> :class:`EncoderOutput`.

    Subclasses set ``backend``, ``hidden_size``, ``image_size``, ``image_mean`` and ``image_std``
    and implement ``forward`` and ``config_dict``.
    """

    backend: str
    hidden_size: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def forward(self, pixel_values: Tensor) -> EncoderOutput:
        raise NotImplementedError

    def config_dict(self) -> dict:
        """JSON-able keyword arguments for ``build_encoder`` that rebuild this architecture."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def freeze(self) -> VisionEncoder:
        """Stop training this encoder: no gradients, and eval mode even under ``parent.train()``."""
        self.requires_grad_(False)
        self.frozen = True
        return self.train(False)

    def unfreeze(self) -> VisionEncoder:
        self.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> VisionEncoder:
        # nn.Module.train recurses through children, so a parent's .train() reaches here.
        return super().train(mode and not self.frozen)
