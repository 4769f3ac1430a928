"""int8 for decoding on the CPU: `mmgpt.load(path, quantize="int8")`.

Every linear of the GPT decoder's blocks and the LM head gets int8 weights with one fp32 scale per
output channel (symmetric, round to nearest: scale = max |w| / 127 over the channel's inputs). The
greedy and sampling loop (`mmgpt.speed.decode`) then runs them through `mmgpt.speed.kernels.rows_linear_int8`,
a quarter of the bytes to read per token:
- on a CPU with AVX-512 VNNI (the default there; `MMGPT_KERNELS_VNNI=0` or `kernels.set_vnni(False)` turns
  it off), int8 x int8: each row of activations is rounded to int8 with its own scale (max |x| / 127,
  dynamic, as torchao's int8 dynamic-activation quantization does), the products summed exactly in int32
  (vpdpbusd), a quarter of the instructions of fp32. Per-row scales keep a row's tokens independent of
  the rest of its batch. On the demo model, 300 of 300 greedy captions and every `mmgpt eval` metric are
  those of fp32 (2026-12-02);
- elsewhere (AVX2), weight-only: fp32 activations, the int8 weights widened in registers.

The model's own float weights are set to the dequantized values (q * scale) in place, so every other
path (beam search through GenerationMixin, the forward, text embeddings) computes with the very
weights int8 decoding uses: with fp32 activations the two agree up to float summation order; with VNNI,
up to the activations' rounding. Memory is not reduced: the float weights stay for those paths, and the
packed int8 copies come on top. Where the kernel cannot run (no C compiler, not x86-64 Linux with AVX2,
MMGPT_KERNELS=0, a GPU, bf16) decoding uses torch's fp32 products on the dequantized weights: the same
tokens as the weight-only kernel, fp32 speed.

`torch.ops.aten._weight_int8pack_mm` is the other road; it needs bf16 activations to be fast
(`python -m benchmarks.int8_decode` times both). Rounding the vision tower's activations to int8 too
(torch's `_int_mm`) was tried on 2026-12-02 and left out: 429 vs 445 ms for 16 images at the small size
(the rounding and rescaling passes ate the faster products) for a 1.2% relative change of the features.
"""

from __future__ import annotations

import torch

MODES = ("int8",)
ATTR = "mmgpt_quantize"  # set on a quantized model; read by mmgpt.speed.decode


def check_mode(quantize: str | None) -> str | None:
    """None or "int8"; anything else is one clear ValueError."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in MODES:
        raise ValueError(f"quantize={quantize!r}: the choices are {', '.join(MODES)} (or None for fp32)")
    return quantize


def quantize_weight(weight: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: weight -> (q int8 of the same shape, scale fp32), the channels being
    the slices along every axis but `dim` (the reduced one: a Conv1D's (in, out) weight reduces dim 0,
    one scale per output column). q * scale approximates weight; |q| <= 127."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=dim, keepdim=True)  # (1, out) for dim 0
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(dim)


def decoder_linears(model) -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, reduced dim) of every weight int8 decoding reads: the blocks' Conv1D weights
    (in, out) and the LM head's (V, D) (tied to the token embedding)."""
    out = []
    for name, mod in model.decoder.transformer.h.named_modules():
        base = getattr(mod, "base_layer", mod)  # a peft LoRA layer: its base weight
        if type(base).__name__ == "Conv1D" and base is mod:
            out.append((f"decoder.transformer.h.{name}.weight", base.weight, 0))
    out.append(("decoder.lm_head.weight", model.decoder.lm_head.weight, 1))
    return out


@torch.no_grad()
def quantize_model(model, quantize: str | None = "int8"):
    """Put `model` on int8 decoding weights (module doc), in place; returns the model. None: unchanged."""
    mode = check_mode(quantize)
    if mode is None:
        return model
    if getattr(model.config, "fusion", "cross_attention") != "cross_attention" or getattr(model, "uses_prefix", False):
        raise ValueError("quantize='int8' needs a cross-attention GPT-2 decoder (the fast decoding path); this "
                         "model uses prefix fusion")
    for _, w, dim in decoder_linears(model):
        q, scale = quantize_weight(w, dim)
        w.copy_((q.float() * scale.unsqueeze(dim)).to(w.dtype))  # the dequantized values, in place
    setattr(model, ATTR, mode)
    return model


def mode_of(model) -> str | None:
    return getattr(model, ATTR, None)
