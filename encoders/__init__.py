"""Image encoders and image preprocessing for mmgpt. Imports neither ``mmgpt`` nor ``train``."""

from __future__ import annotations

from collections.abc import Sequence

from .base import EncoderOutput, VisionEncoder
from .image_io import ImageLoadError, load_image
from .transforms import build_image_transform

# The keys of encoders.hf.BACKENDS, kept here so that image loading does not import the towers.
ENCODER_BACKENDS: tuple[str, ...] = ("vit", "clip", "siglip", "dinov2")


def build_encoder(
    backend: str = "vit",
    config: dict | None = None,
    pretrained: str | None = None,
    freeze: bool = False,
    attn_implementation: str = "sdpa",
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    stem: str = "patch",
    stem_width: int = 32,
    stem_extra: int = 0,
    stem_norm: bool = False,
    stem_init: str = "torch",
    position_init: str = "learned",
    position_scale: float = 0.02,
    pool: str | None = None,
) -> VisionEncoder:
    """Build a vision encoder.

    ``config``: keyword arguments of the backend's Hugging Face vision config (random weights),
    or overrides of the pretrained config when ``pretrained`` (hub id or local folder) is given.
    ``image_mean`` / ``image_std`` override what the checkpoint or the backend default says.
    ``stem``: "patch" (the backbone's own), or a convolutional stem "conv" / "cnn" (encoders/stem.py)
    whose first convolution has ``stem_width`` channels, plus ``stem_extra`` conv3x3 on the token grid,
    and with ``stem_norm`` a LayerNorm over each token's channels at its end; ``stem_init`` "kaiming"
    draws its convolutions He-normal (see encoders/stem.py) instead of PyTorch's default.
    ``position_init="sincos"`` starts the learned position embeddings from 2-D sin-cos codes of
    standard deviation ``position_scale`` (from scratch only). ``pool="mean"``: the pooled vector (what
    ITC embeds) is the mean of the patch tokens instead of the backbone's own (CLS / pooler).
    ``build_encoder(**enc.config_dict())`` rebuilds the same architecture with random weights.
    """
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; valid: {', '.join(ENCODER_BACKENDS)}")
    from .hf import build_hf_encoder  # imports the transformers towers on first use

    encoder = build_hf_encoder(
        backend,
        config=config,
        pretrained=pretrained,
        attn_implementation=attn_implementation,
        image_mean=tuple(image_mean) if image_mean is not None else None,
        image_std=tuple(image_std) if image_std is not None else None,
    )
    if stem in ("conv", "cnn"):
        from .stem import use_conv_stem

        use_conv_stem(encoder.model, backend, stem, width=stem_width, extra=stem_extra, norm=stem_norm,
                      init=stem_init)
        encoder.stem, encoder.stem_width, encoder.stem_extra = stem, stem_width, stem_extra
        encoder.stem_norm, encoder.stem_init = stem_norm, stem_init
    elif stem_norm or stem_init != "torch":
        raise ValueError("stem_norm / stem_init are for a convolutional stem: set stem='conv' or 'cnn'")
    elif stem != "patch":
        raise ValueError(f"unknown stem {stem!r}: use 'patch', 'conv' or 'cnn'")
    if position_init == "sincos":
        if pretrained is not None:
            raise ValueError("position_init='sincos' is for an encoder trained from scratch, not a pretrained one")
        from .stem import use_sincos_positions

        use_sincos_positions(encoder.model, backend, position_scale)
        encoder.position_init = position_init
    elif position_init != "learned":
        raise ValueError(f"unknown position_init {position_init!r}: use 'learned' or 'sincos'")
    if pool not in (None, "mean"):
        raise ValueError(f"unknown pool {pool!r}: use 'mean' (patch tokens' mean) or leave it out (the backbone's own)")
    if pool == "mean":
        encoder.pool = pool
    if freeze:
        encoder.freeze()
    return encoder


__all__ = [
    "ENCODER_BACKENDS",
    "EncoderOutput",
    "ImageLoadError",
    "VisionEncoder",
    "build_encoder",
    "build_image_transform",
    "load_image",
]
