"""Vision encoders that wrap Hugging Face towers: ViT, CLIP, SigLIP and DINOv2.

The wrapped ``PreTrainedModel`` lives at ``.model``, so state-dict keys are ``model.<hf key>``
and weights copy to and from the plain Hugging Face model unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)
from transformers.utils import cached_file

from .base import EncoderOutput, VisionEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackendSpec:
    model_cls: type[PreTrainedModel]
    config_cls: type[PreTrainedConfig]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    has_cls_token: bool  # last_hidden_state[:, 0] is a CLS token
    pool: str  # "cls": last_hidden_state[:, 0]; "pooler": the model's pooler_output
    model_kwargs: dict = field(default_factory=dict)  # extra arguments of the model's __init__
    takes_interpolate_arg: bool = True  # forward(interpolate_pos_encoding=...) exists


BACKENDS: dict[str, BackendSpec] = {
    "vit": BackendSpec(
        ViTModel,
        ViTConfig,
        HALF,
        HALF,
        has_cls_token=True,
        pool="cls",
        model_kwargs={"add_pooling_layer": False},
    ),
    # CLIP's pooler_output is post_layernorm(CLS); last_hidden_state is before that layernorm.
    "clip": BackendSpec(
        CLIPVisionModel, CLIPVisionConfig, CLIP_MEAN, CLIP_STD, has_cls_token=True, pool="pooler"
    ),
    # SigLIP has no CLS token; its pooler_output is the attention-pooling (MAP) head.
    "siglip": BackendSpec(
        SiglipVisionModel, SiglipVisionConfig, HALF, HALF, has_cls_token=False, pool="pooler"
    ),
    # DINOv2 always interpolates its position embeddings, so its forward has no such argument.
    "dinov2": BackendSpec(
        Dinov2Model,
        Dinov2Config,
        IMAGENET_MEAN,
        IMAGENET_STD,
        has_cls_token=True,
        pool="cls",
        takes_interpolate_arg=False,
    ),
}


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face vision tower behind the :class:`VisionEncoder` interface."""

    def __init__(
        self,
        backend: str,
        model: PreTrainedModel,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.spec = BACKENDS[backend]
        self.model = model
        self.image_mean = tuple(float(v) for v in (image_mean or self.spec.image_mean))
        self.image_std = tuple(float(v) for v in (image_std or self.spec.image_std))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return _square(self.model.config.image_size, "image_size")

    @property
    def num_tokens(self) -> int:
        """N in patch_tokens (B, N, D) at ``image_size``: patches, plus one CLS token if any."""
        patches_per_side = self.image_size // _square(self.model.config.patch_size, "patch_size")
        return patches_per_side**2 + int(self.spec.has_cls_token)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> EncoderOutput:
        """pixel_values (B, 3, H, W) -> patch_tokens (B, N, D) and pooled (B, D).

        ``interpolate_pos_encoding`` lets ViT/CLIP/SigLIP take sizes other than ``image_size``
        (DINOv2 always does).
        """
        kwargs = (
            {"interpolate_pos_encoding": interpolate_pos_encoding} if self.spec.takes_interpolate_arg else {}
        )
        out = self.model(pixel_values=pixel_values.to(self.dtype), **kwargs)
        tokens = out.last_hidden_state  # (B, N, D)
        if getattr(self, "pool", None) == "mean":
            pooled = self._mean_pool(tokens)
        elif self.spec.pool == "cls":
            pooled = tokens[:, 0]  # (B, D): CLS after the final layernorm
        elif out.pooler_output is not None:
            pooled = out.pooler_output  # (B, D)
        else:
            pooled = tokens.mean(dim=1)  # (B, D): SigLIP built with vision_use_head=False
        return EncoderOutput(patch_tokens=tokens, pooled=pooled)

    def _mean_pool(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, D): the mean of the patch tokens (the CLS token, if any, left out)."""
        return tokens[:, int(self.spec.has_cls_token):].mean(dim=1)

    def config_dict(self) -> dict:
        return {
            "backend": self.backend,
            "stem": getattr(self, "stem", "patch"),
            **({"pool": self.pool} if getattr(self, "pool", None) else {}),
            **({"stem_width": self.stem_width, "stem_extra": getattr(self, "stem_extra", 0),
                **({"stem_norm": True} if getattr(self, "stem_norm", False) else {}),
                **({"stem_init": self.stem_init} if getattr(self, "stem_init", "torch") != "torch" else {})}
               if getattr(self, "stem", "patch") != "patch" else {}),
            "config": architecture_kwargs(self.model.config),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def build_hf_encoder(
    backend: str,
    config: dict | None = None,
    pretrained: str | None = None,
    attn_implementation: str = "sdpa",
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
) -> HFVisionEncoder:
    """Random weights from ``config`` kwargs, or ``from_pretrained(pretrained)`` (float32).

    With both, ``config`` overrides fields of the pretrained config. ``pretrained`` may also be a
    full CLIP / SigLIP checkpoint: only its vision tower is loaded. Mean / std come from the
    arguments, else the checkpoint's image processor config, else the backend's defaults.
    """
    spec = BACKENDS[backend]
    config = dict(config or {})
    if backend == "dinov2":
        config = _dinov2_mlp_ratio(config)
    _check_config_keys(spec.config_cls, config)
    if pretrained is None:
        hf_config = spec.config_cls(**config)
        model = spec.model_cls._from_config(
            hf_config, attn_implementation=attn_implementation, **spec.model_kwargs
        )
    else:
        model = spec.model_cls.from_pretrained(
            pretrained,
            attn_implementation=attn_implementation,
            dtype=torch.float32,
            **spec.model_kwargs,
            **config,
        )
        stats = read_image_stats(pretrained)
        if stats is not None:
            image_mean = image_mean or stats[0]
            image_std = image_std or stats[1]
    return HFVisionEncoder(backend, model, image_mean=image_mean, image_std=image_std)


def architecture_kwargs(hf_config: PreTrainedConfig) -> dict:
    """The model-specific fields of a vision config: enough to rebuild the architecture."""
    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    own = {f.name for f in dataclasses.fields(hf_config)} - generic
    return {k: v for k, v in hf_config.to_dict().items() if k in own and not k.startswith("_")}


def read_image_stats(pretrained: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(image_mean, image_std) from a checkpoint's image processor config, or None if absent."""
    for filename, section in (
        ("preprocessor_config.json", None),
        ("processor_config.json", "image_processor"),
    ):
        path = cached_file(
            pretrained,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if section is not None:
            data = data.get(section) or {}
        if "image_mean" in data and "image_std" in data:
            return _three(data["image_mean"]), _three(data["image_std"])
    return None


def _three(value: float | list[float]) -> tuple[float, ...]:
    """A per-channel statistic; a single number stands for all three channels."""
    values = [value] * 3 if isinstance(value, int | float) else list(value)
    return tuple(float(v) for v in values)


def _square(value: int | list[int] | tuple[int, int], name: str) -> int:
    if isinstance(value, int):
        return value
    height, width = value
    if height != width:
        raise ValueError(f"{name} must be square, got {height} x {width}")
    return int(height)


def _dinov2_mlp_ratio(config: dict) -> dict:
    """DINOv2 sizes its MLP by ``mlp_ratio``; accept the ``intermediate_size`` the other towers use."""
    if "intermediate_size" not in config:
        return config
    config = dict(config)
    intermediate = config.pop("intermediate_size")
    hidden = config.get("hidden_size", Dinov2Config().hidden_size)
    if intermediate % hidden:
        raise ValueError(
            f"dinov2: intermediate_size {intermediate} must be a multiple of hidden_size {hidden}"
        )
    config["mlp_ratio"] = intermediate // hidden
    return config


def _check_config_keys(config_cls: type[PreTrainedConfig], config: dict) -> None:
    """Hugging Face configs keep unknown keys silently; a typo here should fail loudly."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields: {unknown}; known: {sorted(known)}")
