"""Projection adapters: patch tokens (B, N, Dv) -> decoder memory (B, K, Dt)."""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_TYPES = ("linear", "mlp", "resampler")


class LinearAdapter(nn.Module):
    """One linear map, as transformers' VisionEncoderDecoder's `enc_to_dec_proj`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N, Dt)
        return self.proj(x)


# LLaVA-1.5's two-layer GELU projector.
class MLPAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N, Dt)
        return self.fc2(self.act(self.fc1(x)))


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(kv)
        q = q + self.attn(self.ln_q(q), kv, kv, need_weights=False)[0]  # (B, K, Dt)
        return q + self.ff(self.ln_ff(q))


# Perceiver resampler (Flamingo, Alayrac et al. 2022): K learned queries cross-attend to the patches.
class ResamplerAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, depth: int = 1, num_heads: int = 4):
        super().__init__()
        self.kv_proj = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(out_dim, num_heads) for _ in range(depth))
        self.ln_out = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv_proj(x)  # (B, N, Dt)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, K, Dt)
        for layer in self.layers:
            q = layer(q, kv)
        return self.ln_out(q)  # (B, K, Dt)


class WithPositions(nn.Module):
    """An adapter whose output patch tokens get fixed 2-D sin-cos position codes added, DETR-style, so
    the decoder's cross-attention keys say where each token is however the encoder's features grew.
    The codes are `scale` times the output tokens' RMS (measured on the fly, not differentiated):
    a fixed share of the signal. A leading CLS token (N = 1 + g*g) gets none. No weights."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"adapter positions must be a positive share of the token scale, got {scale}")
        self.inner, self.scale = inner, float(scale)
        self._codes: dict[tuple, torch.Tensor] = {}

    def codes(self, n: int, dim: int, device, dtype) -> tuple[int, torch.Tensor]:
        g = round(n**0.5)
        skip = 0 if g * g == n else 1
        g = round((n - skip) ** 0.5)
        if g * g != n - skip:
            raise ValueError(f"adapter positions need a square token grid, got {n} tokens")
        key = (n, dim, device, dtype)
        if key not in self._codes:
            from encoders.stem import sincos_2d

            c = sincos_2d(g, dim)  # (g*g, dim)
            self._codes[key] = (c / c.pow(2).mean().sqrt()).to(device=device, dtype=dtype)
        return skip, self._codes[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, Dv) -> (B, N, Dt)
        y = self.inner(x)
        skip, code = self.codes(y.shape[1], y.shape[2], y.device, y.dtype)
        rms = y[:, skip:].detach().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()  # (B, 1, 1)
        pos = self.scale * rms * code  # (B, g*g, Dt)
        return torch.cat([y[:, :skip], y[:, skip:] + pos], dim=1) if skip else y + pos


def build_adapter(spec: dict, in_dim: int, out_dim: int) -> nn.Module:
    kind = spec.get("type", "mlp")
    extra = {k: v for k, v in spec.items() if k not in ("type", "positions")}
    if spec.get("positions"):
        if kind not in ("linear", "mlp"):
            raise ValueError(f"adapter positions are for the token-wise adapters (linear, mlp), not {kind!r}")
        return WithPositions(build_adapter({"type": kind, **extra}, in_dim, out_dim), spec["positions"])
    if kind == "linear":
        return LinearAdapter(in_dim, out_dim)
    if kind == "mlp":
        return MLPAdapter(in_dim, out_dim)
    if kind == "resampler":
        return ResamplerAdapter(in_dim, out_dim, **extra)
    raise ValueError(f"adapter type {kind!r} is unknown; choose one of {ADAPTER_TYPES}")
