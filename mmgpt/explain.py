"""Where did the model look? Per-word cross-attention maps over the image, drawn with PIL.

`explain` generates a caption (or an answer) greedily, then runs one teacher-forced forward over
prompt + generated tokens with the decoder's attention switched to eager, so that every
`block.crossattention` returns its attention weights (B, H, T, K). For the i-th generated token it
keeps the row of the position that predicted it (the step where the model chose that word),
averaged over heads and cross-attention layers, drops the encoder's [CLS] token and folds the
patch tokens back into the patch grid. This is attention (where the queries went), not attribution:
a good picture to look at, not a proof of what caused a word.

The maps exist only where the decoder cross-attends to a memory that *is* the patch grid: the `linear`
and `mlp` adapters keep one memory token per ViT token; the `resampler` hands the decoder learned
queries instead, and prefix fusion has no cross-attention at all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

MAX_COLS = 6  # panels per row of the rendered sheet
PER_PATCH_ADAPTERS = ("linear", "mlp")


class ExplainError(ValueError):
    """The model cannot be explained this way (e.g. a resampler adapter); one readable line."""


# --- attention capture ---------------------------------------------------------------------------


@contextmanager
def eager_attention(model):
    """Temporarily run the decoder's attention in eager mode (GPT2Attention reads the setting per call),
    the only mode that returns attention weights. It changes the model's config while it lasts: do not
    run other calls on the same model object from another thread meanwhile."""
    cfg = model.decoder.config
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = before


@torch.no_grad()
def cross_attention_weights(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, memory: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher-forced decoder pass -> (weights (L, B, H, T, K), logits (B, T, V)).

    L = the cross-attending layers (those >= model.k); K = memory tokens. Every row of the weights is
    a softmax over the K memory tokens, so it sums to 1.
    """
    blocks = list(model.decoder.transformer.h)[model.k :]
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[1].detach().float())  # (B, H, T, K)

    hooks = [blk.crossattention.register_forward_hook(keep) for blk in blocks]
    try:
        with eager_attention(model):
            hidden, _, _ = model.run_decoder(input_ids, attention_mask, memory)  # (B, T, Dt)
    finally:
        for h in hooks:
            h.remove()
    if len(captured) != len(blocks) or any(w is None for w in captured):
        raise RuntimeError("cross-attention weights were not returned; is the decoder GPT-2?")
    return torch.stack(captured), model.decoder.lm_head(hidden)  # (L, B, H, T, K), (B, T, V)


def check_explainable(model) -> None:
    """Raise ExplainError unless the decoder cross-attends to a memory of one token per image patch."""
    fusion = getattr(model.config, "fusion", None) or "cross_attention"
    if fusion != "cross_attention":
        raise ExplainError(
            f"this model uses {fusion} fusion: the image tokens go in front of the text and there is no "
            "cross-attention to draw; explain works with fusion='cross_attention' (GPT-2 decoders)"
        )
    kind = model.config.adapter.get("type", "mlp")
    if kind not in PER_PATCH_ADAPTERS:
        n = model.config.adapter.get("num_queries", 32)
        raise ExplainError(
            f"this model's {kind} adapter hands the decoder {n} learned query tokens, not image patches, "
            f"so per-patch attention maps are not available; explain works with the "
            f"{' and '.join(PER_PATCH_ADAPTERS)} adapters"
        )


def patch_grid(model, num_memory_tokens: int) -> tuple[int, int]:
    """-> (number of leading non-patch tokens to drop, side of the square patch grid)."""
    check_explainable(model)
    spec = getattr(model.vision, "spec", None)
    skip = int(spec.has_cls_token) if spec is not None else 1  # ViT's [CLS] comes first
    side = math.isqrt(num_memory_tokens - skip)
    if side * side != num_memory_tokens - skip:
        raise ExplainError(f"{num_memory_tokens - skip} patch tokens do not form a square grid")
    return skip, side


# --- explain -------------------------------------------------------------------------------------


@torch.no_grad()
def explain(model, processor, image, question: str | None = None, max_new_tokens: int = 24):
    """Caption `image` (or answer `question` about it) and say where each generated token looked.

    -> (text, tokens, maps): the decoded text, the decoded text of each generated token (EOS not
    included), and maps (n_tokens, grid, grid): cross-attention mass on each patch, averaged over
    heads and cross-attention layers (each map sums to 1 minus the mass on [CLS]).
    """
    from encoders import load_image

    check_explainable(model)  # fail before generating anything
    was_training = model.training
    model.eval()
    try:
        return _explain(model, processor, load_image(image), question, max_new_tokens)
    finally:
        model.train(was_training)


def _explain(model, processor, image, question: str | None, max_new_tokens: int):
    param = next(model.parameters())
    pixels = processor.images([image]).to(param.device, param.dtype)  # (1, 3, S, S)
    task = "vqa" if question else "caption"
    batch = processor.batch_prompts([task], [question or ""])
    prompt = batch["input_ids"].to(param.device)  # (1, P)
    p = prompt.shape[1]

    memory = model.encode_image(pixels).tokens  # (1, K, Dt)
    out = model.generate(
        encoder_hidden_states=memory, input_ids=prompt, attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
    )  # (1, P + new)
    new = out[0, p:].tolist()
    if processor.eos_id in new:
        new = new[: new.index(processor.eos_id)]
    text = processor.decode(new)
    tokens = [processor.tokenizer.decode([t]) for t in new]
    skip, side = patch_grid(model, memory.shape[1])
    if not new:
        return text, tokens, torch.zeros(0, side, side)

    ids = out[:, : p + len(new)]  # (1, P + n): prompt + generated, EOS left out
    weights, _ = cross_attention_weights(model, ids, torch.ones_like(ids), memory)  # (L, 1, H, T, K)
    rows = weights.mean(dim=(0, 2))[0, p - 1 : p - 1 + len(new)]  # (n, K): position t predicts token t+1
    maps = rows[:, skip:].reshape(len(new), side, side)  # (n, grid, grid), patches in row-major order
    return text, tokens, maps.cpu()


# --- drawing -------------------------------------------------------------------------------------

# A classic heat-map ramp: dark blue -> blue -> cyan -> yellow -> red.
_RAMP = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours on the ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def label_height(panel: int) -> int:
    return panel // 3


def sheet_size(n_tokens: int, panel: int = 192) -> tuple[int, int]:
    """(width, height) of `render_explanation`'s picture: the image panel, then one panel per token,
    MAX_COLS to a row, each panel x panel with a label band of label_height(panel) below."""
    n = n_tokens + 1
    cols = min(n, MAX_COLS)
    rows = -(-n // cols)
    return cols * panel, rows * (panel + label_height(panel))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: float) -> str:
    """Cut `text` to fit `width`, marking the cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + " ..."
    return [_fit(line, font, width) for line in lines]


def _overlay(square: Image.Image, heat: np.ndarray) -> Image.Image:
    """Blend a (g, g) map, stretched to its own [min, max] and upsampled bilinearly, over the square image:
    the more attention, the more colour (and the less picture) shows."""
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    up = np.asarray(Image.fromarray(norm.astype(np.float32)).resize(square.size, Image.BILINEAR))  # mode "F"
    alpha = (0.15 + 0.6 * np.clip(up, 0.0, 1.0))[..., None]  # (S, S, 1)
    mixed = np.asarray(square, dtype=np.float32) * (1 - alpha) + colorize(up).astype(np.float32) * alpha
    return Image.fromarray(mixed.round().astype(np.uint8))


def render_explanation(image, text: str, tokens: list[str], maps, panel: int = 192) -> Image.Image:
    """A sheet of panels: the image with the whole text, then each token's map over the image.

    The image is centre-cropped to a square (what the model saw) and scaled to the panel; each map is
    stretched to its own range (its least-attended patch is blue, its most-attended red, whatever their
    shares: compare where, not how much, across panels).
    """
    from encoders import load_image

    maps = np.asarray(maps.detach().float().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float32)
    if len(maps) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(maps)} maps")
    pad = max(2, panel // 64)
    inner = panel - 2 * pad
    square = ImageOps.fit(load_image(image), (inner, inner), Image.BICUBIC)
    width, height = sheet_size(len(tokens), panel)
    label = label_height(panel)
    cols = min(len(tokens) + 1, MAX_COLS)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(max(8, panel // 12))
    line = max(10, panel // 10)
    panels = [(square, _wrap(text or "(nothing generated)", font, inner, max(1, label // line)))]
    for i, (tok, heat) in enumerate(zip(tokens, maps)):
        word = tok.strip() or repr(tok)
        panels.append((_overlay(square, heat), [_fit(f"{i + 1}: {word}", font, inner)]))
    for j, (picture, lines) in enumerate(panels):
        x, y = (j % cols) * panel, (j // cols) * (panel + label)
        sheet.paste(picture, (x + pad, y + pad))
        for k, text_line in enumerate(lines):
            draw.text((x + pad, y + panel + k * line), text_line, fill=(0, 0, 0), font=font)
    return sheet
