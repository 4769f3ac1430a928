"""MMGPTConfig: one transformers config holding the vision, text and adapter parts as plain dicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import GPT2Config, PreTrainedConfig

FUSIONS = ("cross_attention",)
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


class MMGPTConfig(PreTrainedConfig):
    """Nested config: `vision` ({"backend", "config"}), `text` (GPT2Config kwargs), `adapter` ({"type", ...}).

    Parts are stored as JSON-able dicts, so `to_json_string` / `from_pretrained` round-trip them untouched.
    Pretrained part names (hub ids or folders) are recorded for provenance only: `__init__` of the model
    never downloads; `MMGPTModel.from_pretrained_parts` does.
    """

    model_type = "mmgpt"

    vision: dict | None = None
    text: dict | None = None
    adapter: dict | None = None
    fusion: str = "cross_attention"
    projection_dim: int = 256
    unimodal_layers: int = 0
    itc_weight: float = 1.0
    lm_weight: float = 1.0
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    label_smoothing: float = 0.0
    vision_pretrained: str | None = None
    text_pretrained: str | None = None
    tokenizer: dict | None = None

    def __post_init__(self, **kwargs):
        if self.vision is None:
            self.vision = {"backend": "vit", "config": {}}
        self.vision = {"backend": "vit", "config": {}, **self.vision}
        self.text = dict(self.text or {})
        self.adapter = {"type": "mlp", **(self.adapter or {})}
        self.tokenizer = dict(self.tokenizer or {})
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is not supported; choose one of {FUSIONS}")
        n_layer = self.text.get("n_layer", self.text.get("num_hidden_layers", 12))
        if not 0 <= self.unimodal_layers < n_layer:
            raise ValueError(
                f"unimodal_layers={self.unimodal_layers} must be in [0, {n_layer}) (the decoder has {n_layer} layers)"
            )
        super().__post_init__(**kwargs)

    # The decoder's own config, used by the model and by GenerationMixin (cache sizing, vocab).
    @property
    def text_config(self) -> GPT2Config:
        kw = {k: v for k, v in self.text.items() if k not in ("model_type", "transformers_version", "architectures")}
        kw["add_cross_attention"] = True
        return GPT2Config(**kw)

    def get_text_config(self, decoder=None, encoder=None) -> GPT2Config:
        return self.text_config

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MMGPTConfig:
        """Build from `configs/model/NAME.json` (or a path to such a JSON file)."""
        path = Path(name)
        if not path.suffix:
            path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
            raise ValueError(f"unknown model preset {name!r}: no file {path}; known presets: {known}")
        data = json.loads(path.read_text())
        data.pop("_comment", None)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return cls(**data)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))
