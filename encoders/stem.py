"""A convolutional stem for ViT: stride-2 3x3 convolutions in place of the one big patchify conv.

Early convolutions make ViTs optimise faster and more robustly (Xiao et al. 2021, "Early Convolutions
Help Transformers See Better"); the token grid is unchanged, so nothing else in the model moves.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, hidden, H / patch, W / patch).

    ``kind="conv"``: log2(patch) - 1 conv3x3/s2 + GELU, then a 2x2/s2 conv.
    ``kind="cnn"``: a full-resolution conv3x3 first, then log2(patch) conv3x3/s2 (overlapping
    receptive fields, ~3x the FLOPs of "conv" at 64 px / patch 8).
    ``extra``: that many more GELU + conv3x3 (stride 1) on the token grid, each widening every token's
    receptive field by two tokens (for "cnn" at patch 8: 17 px, then 33 px with one extra).
    ``norm``: a LayerNorm over each token's channels at the end (as Swin's patch_norm). Without it the
    convolutions' output grows ~20x in the first few hundred steps while the position embeddings added
    after the stem stay ~0.02: trained tokens then no longer say where they are (a linear probe finds an
    object's column 8-way 20% of the time, 99.8% at init). Normalised tokens keep content and position
    on the same scale when paired with larger position embeddings (``position_scale`` 0.1-0.5). In the
    8-minute shapes demo that keeps the column readable but has not beaten the plain stem (see
    configs/train/shapes-tiny.yaml).
    ``init``: "torch" keeps PyTorch's default conv init (uniform, gain 1/sqrt(3)), under which each
    conv + GELU shrinks the signal: at 64 px / patch 8 the "cnn" stem's output is ~0.02 for inputs of
    std ~1, every GELU runs in its linear range, and shape (a nonlinear feature) is learned late.
    "kaiming" draws He-normal weights for GELU/ReLU (std sqrt(2 / fan_in)) and zero biases, which keep
    the signal's scale through the stack.
    """

    def __init__(self, hidden: int, patch: int, in_channels: int = 3, width: int = 32, kind: str = "conv",
                 extra: int = 0, norm: bool = False, init: str = "torch"):
        super().__init__()
        if init not in ("torch", "kaiming"):
            raise ValueError(f"unknown stem init {init!r}: use 'torch' or 'kaiming'")
        if kind not in ("conv", "cnn"):
            raise ValueError(f"unknown conv stem kind {kind!r}: use 'conv' or 'cnn'")
        n = int(math.log2(patch))
        if 2**n != patch or n < 2:
            raise ValueError(f"the conv stem needs a power-of-two patch size >= 4, got {patch}")
        layers, ch = [], in_channels
        if kind == "cnn":
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.GELU()]
            ch = width
        for i in range(n - 1):
            out = min(width * 2 ** (i + (kind == "cnn")), hidden)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GELU()]
            ch = out
        layers.append(nn.Conv2d(ch, hidden, 3, stride=2, padding=1) if kind == "cnn" else nn.Conv2d(ch, hidden, 2, stride=2))
        for _ in range(extra):
            layers += [nn.GELU(), nn.Conv2d(hidden, hidden, 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(hidden) if norm else None
        if init == "kaiming":
            for m in self.layers:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)

    @property
    def weight(self):  # transformers' ViT reads projection.weight.dtype to cast its input
        return self.layers[-1].weight

    def forward(self, x):
        x = self.layers(x)  # (B, hidden, H / patch, W / patch)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


def use_conv_stem(model, backend: str, kind: str = "conv", width: int = 32, extra: int = 0,
                  norm: bool = False, init: str = "torch") -> None:
    """Swap the patchify conv of a Hugging Face ViT for a ConvStem (random weights)."""
    if backend != "vit":
        raise ValueError(f"stem={kind!r} is available for the vit backend, not {backend!r}")
    pe = model.embeddings.patch_embeddings
    if width < 1:
        raise ValueError(f"stem_width must be a positive channel count, got {width}")
    stem = ConvStem(model.config.hidden_size, model.config.patch_size, model.config.num_channels, width=width,
                    kind=kind, extra=extra, norm=norm, init=init)
    for m in stem.modules():
        m._is_hf_initialized = True  # keep the stem's own init: ViT's std-0.02 init would shrink the signal 100x
    pe.projection = stem


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position codes (MAE, He et al. 2021): the first half of
    the channels encode the column (x), the second half the row (y), each at dim/4 frequencies."""
    import torch

    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)  # (q,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")

    def enc(v):  # (grid*grid,) -> (grid*grid, 2q)
        a = v.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], dim=1)
    return torch.cat([enc(xs), enc(ys)], dim=1).float()  # (grid*grid, dim)


def use_sincos_positions(model, backend: str, scale: float = 0.02) -> None:
    """Initialise a Hugging Face ViT's learned position embeddings with 2-D sin-cos codes (still
    trained): at init every token knows its column and row as smooth codes instead of random vectors.
    ``scale`` sets their standard deviation (HF's random init is 0.02)."""
    if backend != "vit":
        raise ValueError(f"position_init='sincos' is available for the vit backend, not {backend!r}")
    emb = model.embeddings
    n_tokens, dim = emb.position_embeddings.shape[1:]
    grid = round((n_tokens - 1) ** 0.5)
    if grid * grid != n_tokens - 1:
        raise ValueError(f"position_init='sincos' needs a square token grid, got {n_tokens - 1} patches")
    codes = sincos_2d(grid, dim)
    codes = codes * (scale / codes.std())
    with torch.no_grad():
        emb.position_embeddings[0, 0].zero_()  # CLS
        emb.position_embeddings[0, 1:].copy_(codes)
    emb._is_hf_initialized = True
