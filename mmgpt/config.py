"""MMGPTConfig: one transformers config holding the vision, text and adapter parts as plain dicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

FUSIONS = ("cross_attention", "prefix")
# Keys of a decoder's own config dict that describe the file, not the model (and a saved dtype, which would
# build the decoder in another precision than the rest of the model).
_TEXT_META_KEYS = ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype")
# LoRA target modules by decoder type; any other type gets DEFAULT_LORA_TARGETS (the common Llama naming).
LORA_TARGETS = {"gpt2": ("c_attn", "c_proj", "q_attn")}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


class MMGPTConfig(PreTrainedConfig):
    """Nested config: `vision` ({"backend", "config"}), `text` (the decoder's config kwargs, with its
    `model_type`, gpt2 by default), `adapter` ({"type", ...}).

    `fusion`: `cross_attention` (GPT-2 blocks attend to the adapter output) or `prefix` (the adapter output
    is prepended to the token embeddings: any causal LM). None picks cross_attention for GPT-2, else prefix.

    Parts are stored as JSON-able dicts, so `to_json_string` / `from_pretrained` round-trip them untouched.
    Pretrained part names (hub ids or folders) are recorded for provenance only: `__init__` of the model
    never downloads; `MMGPTModel.from_pretrained_parts` does.
    """

    model_type = "mmgpt"
    # What transformers' Trainer leaves out of predictions: the loss parts and embeddings (logits stay)
    keys_to_ignore_at_inference = ["lm_loss", "itc_loss", "bow_loss", "image_embeds", "text_embeds", "logit_scale",
                                   "cache"]

    vision: dict | None = None
    text: dict | None = None
    adapter: dict | None = None
    fusion: str | None = None
    projection_dim: int = 256
    unimodal_layers: int = 0
    itc_weight: float = 1.0
    lm_weight: float = 1.0
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    label_smoothing: float = 0.0
    # scale of the contrastive gradient that flows into the shared decoder through the text embedding
    # (1 = plain; below 1 the decoder learns mostly from the LM loss, the text projection fully from ITC)
    itc_text_grad_scale: float = 1.0
    # weight of the bag-of-words loss: from the mean of the image tokens the decoder reads, a yes/no
    # prediction per vocabulary token of whether its caption holds it (binary cross-entropy summed over
    # the vocabulary). A direct signal into every image token from step one; 0 = off (no `bow_head`)
    bow_weight: float = 0.0
    # images one conversation may hold: cross-attention adds a learned code per image slot to its tokens so
    # the decoder tells "the first" from "the second" (1 = the one-image models before conversations: no code)
    max_images: int = 1
    # prefix fusion: the token that marks where an image's tokens go (a conversation's `<image>`), or None
    image_token_id: int | None = None
    vision_pretrained: str | None = None
    text_pretrained: str | None = None
    tokenizer: dict | None = None

    def __post_init__(self, **kwargs):
        if self.vision is None:
            self.vision = {"backend": "vit", "config": {}}
        self.vision = {"backend": "vit", "config": {}, **self.vision}
        self.text = {"model_type": "gpt2", **(self.text or {})}
        self.adapter = {"type": "mlp", **(self.adapter or {})}
        self.tokenizer = dict(self.tokenizer or {})
        if self.fusion is None:
            self.fusion = "cross_attention" if self.text["model_type"] == "gpt2" else "prefix"
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is not supported; choose one of {FUSIONS}")
        if self.fusion == "cross_attention" and self.text["model_type"] != "gpt2":
            raise ValueError(
                f"fusion='cross_attention' needs a GPT-2 decoder (text model_type {self.text['model_type']!r}); "
                "use fusion='prefix' for other causal LMs"
            )
        if self.fusion == "prefix" and self.unimodal_layers != 0:
            raise ValueError(
                f"unimodal_layers={self.unimodal_layers}: the CoCa split needs cross-attention; with fusion='prefix' "
                "the text embedding comes from an image-free decoder pass, so unimodal_layers must be 0"
            )
        if not isinstance(self.max_images, int) or isinstance(self.max_images, bool) or not 1 <= self.max_images <= 64:
            raise ValueError(f"max_images={self.max_images!r} must be an image count in [1, 64]")
        n_layer = self.text.get("num_hidden_layers", self.text.get("n_layer"))
        if n_layer is None:  # the decoder class's default
            n_layer = self.text_config.num_hidden_layers
        if not 0 <= self.unimodal_layers < n_layer:
            raise ValueError(
                f"unimodal_layers={self.unimodal_layers} must be in [0, {n_layer}) (the decoder has {n_layer} layers)"
            )
        super().__post_init__(**kwargs)

    # The decoder's own config, used by the model and by GenerationMixin (cache sizing, vocab).
    @property
    def text_config(self) -> PreTrainedConfig:
        kw = {k: v for k, v in self.text.items() if k not in _TEXT_META_KEYS}
        if self.fusion == "cross_attention":  # GPT-2 only (checked in __post_init__)
            kw["add_cross_attention"] = True
        return AutoConfig.for_model(self.text["model_type"], **kw)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.text_config

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        """Default LoRA targets for this decoder type: its attention projections (and GPT-2's MLP c_proj)."""
        return LORA_TARGETS.get(self.text["model_type"], DEFAULT_LORA_TARGETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MMGPTConfig:
        """Build from `configs/model/NAME.json` (or a path to such a JSON file)."""
        path = PRESET_DIR / f"{name}.json"  # a name may hold dots: "qwen2.5-0.5b"
        if not path.is_file():
            path = Path(name) if Path(name).suffix == ".json" else path
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
            raise ValueError(f"unknown model preset {name!r}: no file {path}; known presets: {known}")
        data = json.loads(path.read_text())
        data.pop("_comment", None)
        _check_override_keys(cls, overrides)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return cls(**data)


# Keys `vision` and `adapter` read besides a backend's own `config` (mmgpt/model.py, mmgpt/adapter.py).
VISION_KEYS = ("backend", "config", "stem", "stem_width", "stem_extra", "stem_norm", "stem_init", "position_init",
               "position_scale", "pool", "image_mean", "image_std")
ADAPTER_KEYS = ("type", "positions", "num_queries", "depth", "num_heads")
GENERIC_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "tie_word_embeddings")


def _check_override_keys(cls, overrides: dict) -> None:
    """A misspelt override (`vision.position_int`) was stored and silently did nothing: name it and the
    nearest key. `text` takes the decoder config's own keys and `vision.config` the backend's: not checked."""
    import difflib

    def check(keys, known, where: str, shown=None) -> None:
        for key in keys:
            if key not in known:
                near = difflib.get_close_matches(key, list(shown or known), n=1, cutoff=0.6)
                hint = (f"; did you mean '{where}{near[0]}'?" if near
                        else f"; known: {', '.join(sorted(shown or known))}")
                raise ValueError(f"unknown model option '{where}{key}'{hint}")

    own = set(cls.__annotations__) | set(GENERIC_KEYS)  # the options of an mmgpt model, for the message
    check(overrides, set(cls.__dataclass_fields__) | set(GENERIC_KEYS), "", shown=own)
    for part, known in (("vision", VISION_KEYS), ("adapter", ADAPTER_KEYS)):
        if isinstance(overrides.get(part), dict):
            check(overrides[part], set(known), f"{part}.")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))
