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


def build_adapter(spec: dict, in_dim: int, out_dim: int) -> nn.Module:
    kind = spec.get("type", "mlp")
    extra = {k: v for k, v in spec.items() if k != "type"}
    if kind == "linear":
        return LinearAdapter(in_dim, out_dim)
    if kind == "mlp":
        return MLPAdapter(in_dim, out_dim)
    if kind == "resampler":
        return ResamplerAdapter(in_dim, out_dim, **extra)
    raise ValueError(f"adapter type {kind!r} is unknown; choose one of {ADAPTER_TYPES}")
