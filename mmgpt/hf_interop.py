"""mmgpt folders in transformers' own entry points: the Auto classes and the image-text-to-text and
zero-shot-image-classification pipelines.

`import mmgpt` calls `register()`, after which

    >>> from transformers import AutoModel, AutoProcessor, pipeline
    >>> model = AutoModel.from_pretrained("runs/shapes/model")          # an MMGPTModel
    >>> processor = AutoProcessor.from_pretrained("runs/shapes/model")  # an MMGPTHFProcessor
    >>> pipe = pipeline("image-text-to-text", model="runs/shapes/model")
    >>> pipe("photo.png", text="")[0]["generated_text"]                  # a caption, as `mmgpt caption`
    >>> pipe("photo.png", text="what color is the circle?", return_full_text=False)  # as `mmgpt ask`

transformers' pipelines take a `ProcessorMixin`; `MMGPTHFProcessor` is one that wraps mmgpt's own processor
(`mmgpt.processor.MMGPTProcessor`, found as `.mmgpt_processor`; its other methods are reachable on the
wrapper too). An empty text asks for a caption, any other text is a question (the `vqa` prompt template).

    >>> clf = pipeline("zero-shot-image-classification", model="runs/shapes/model")
    >>> clf("photo.png", candidate_labels=["a red circle", "a blue square"], hypothesis_template="{}")

gives softmax(logit_scale * cosine) of the contrastive embeddings (`MMGPTForZeroShotImageClassification`,
same weights). That pipeline loads an image processor through AutoImageProcessor, which needs the folder's
preprocessor_config.json: `write_hub_files` writes it (mmgpt.model_card does, for every exported folder).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import ModelOutput

from mmgpt.model import MMGPTModel
from mmgpt.processor import MMGPTProcessor

__all__ = ["MMGPTForZeroShotImageClassification", "MMGPTHFProcessor", "MMGPTImageProcessor", "register",
           "write_hub_files"]


class MMGPTHFProcessor(ProcessorMixin):
    """A transformers processor around `MMGPTProcessor`: `__call__(images=, text=)`, `batch_decode`,
    `post_process_image_text_to_text`, `apply_chat_template` (where mmgpt's processor has one)."""

    def __init__(self, tokenizer=None, mmgpt_processor: MMGPTProcessor | None = None, chat_template=None):
        if mmgpt_processor is None:
            if tokenizer is None:
                raise ValueError("MMGPTHFProcessor needs a tokenizer or an MMGPTProcessor")
            mmgpt_processor = MMGPTProcessor(tokenizer)
        if chat_template is None:
            chat_template = getattr(mmgpt_processor, "chat_template", None)
        super().__init__(tokenizer=mmgpt_processor.tokenizer, chat_template=chat_template)
        self.mmgpt_processor = mmgpt_processor

    def __getattr__(self, name: str):
        # only reached for names the wrapper lacks: mmgpt's processor API (images, batch_prompts, ...)
        inner = self.__dict__.get("mmgpt_processor")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(inner, name)

    # --- loading and saving: the folder layout of mmgpt's own processor ---------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> MMGPTHFProcessor:
        """A model folder or hub id (hub and dtype keywords that transformers passes along are ignored)."""
        from mmgpt.folders import resolve_model_folder

        folder = resolve_model_folder(pretrained_model_name_or_path)
        return cls(mmgpt_processor=MMGPTProcessor.from_pretrained(folder))

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise ValueError("push_to_hub: save the folder, then upload it with `hf upload` (docs/models.md, The Hub)")
        self.mmgpt_processor.save_pretrained(Path(save_directory))
        return [os.fspath(save_directory)]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mmgpt_processor.to_dict()})"

    # --- inputs ----------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """images -> pixel_values (B, 3, S, S); text -> left-padded prompts (B, T): "" (or None with images)
        is a caption prompt, any other text a question. One text for many images is asked of each."""
        if videos is not None or audio is not None:
            raise ValueError("mmgpt models read images and text only")
        proc = self.mmgpt_processor
        data = {}
        n_images = 0
        if images is not None:
            data["pixel_values"] = proc.images(images)  # (B, 3, S, S)
            n_images = data["pixel_values"].shape[0]
        if text is not None or images is not None:
            texts = [text or ""] if text is None or isinstance(text, str) else [t or "" for t in text]
            if len(texts) == 1 and n_images > 1:
                texts = texts * n_images
            if n_images and len(texts) != n_images:
                raise ValueError(f"{len(texts)} texts for {n_images} images: give one text, or one per image")
            tasks = ["vqa" if t.strip() else "caption" for t in texts]
            data.update(proc.batch_prompts(tasks, texts))  # input_ids, attention_mask (B, T)
        return BatchFeature(data=data)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """mmgpt's own chat template (MMGPTProcessor.apply_chat_template), given the keywords it takes."""
        own = getattr(self.mmgpt_processor, "apply_chat_template", None)
        if own is None:
            raise NotImplementedError("this mmgpt processor has no chat template: pass an image and a plain text "
                                      "prompt instead of chat messages")
        params = inspect.signature(own).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        if chat_template is not None and "chat_template" in params:
            kwargs["chat_template"] = chat_template
        out = own(conversation, **kwargs)
        if isinstance(out, dict) and not isinstance(out, BatchFeature):
            out = BatchFeature(data=dict(out))
        return out

    # --- outputs ---------------------------------------------------------------------------------

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Each row up to its first EOS, leading BOS / padding skipped (as `mmgpt caption` decodes)."""
        return self.mmgpt_processor.batch_decode(sequences)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.mmgpt_processor.decode(ids)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        return self.batch_decode(generated_outputs)


class MMGPTImageProcessor(BaseImageProcessor):
    """Images -> pixel_values with mmgpt's own transform, for pipelines that load an image processor
    (zero-shot-image-classification). Read from the folder's mmgpt_processor.json; AutoImageProcessor finds
    it through the folder's preprocessor_config.json (`write_hub_files`)."""

    model_input_names = ["pixel_values"]

    def __init__(self, mmgpt_processor: MMGPTProcessor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mmgpt_processor = mmgpt_processor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> MMGPTImageProcessor:
        from mmgpt.folders import resolve_model_folder

        return cls(MMGPTProcessor.from_pretrained(resolve_model_folder(pretrained_model_name_or_path)))

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        return BatchFeature(data={"pixel_values": self.mmgpt_processor.images(images)})


@dataclass
class ZeroShotOutput(ModelOutput):
    logits_per_image: torch.Tensor | None = None  # (B_img, B_txt) logit_scale * cosine
    logits_per_text: torch.Tensor | None = None  # (B_txt, B_img)
    image_embeds: torch.Tensor | None = None  # (B_img, E), L2-normed
    text_embeds: torch.Tensor | None = None  # (B_txt, E), L2-normed


class MMGPTForZeroShotImageClassification(MMGPTModel):
    """The contrastive half as CLIP's output: `logits_per_image` = logit_scale * cosine of the image and
    text embeddings (what transformers' zero-shot-image-classification pipeline reads). Same weights as
    MMGPTModel. Texts come as the tokenizer gives them (no special tokens); they are read as mmgpt embeds
    captions, `[BOS] text [EOS]` right-padded (MMGPTProcessor.batch_texts)."""

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs) -> ZeroShotOutput:
        ids, mask = self._caption_rows(input_ids, attention_mask)
        text = self.embed_text(ids, mask)  # (B_txt, E)
        image = self.embed_image(pixel_values)  # (B_img, E)
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        per_image = scale * image @ text.T  # (B_img, B_txt)
        return ZeroShotOutput(logits_per_image=per_image, logits_per_text=per_image.T, image_embeds=image,
                              text_embeds=text)

    def _caption_rows(self, input_ids, attention_mask):
        gc = self.generation_config
        tc = self.config.text_config
        bos = gc.bos_token_id if gc.bos_token_id is not None else tc.bos_token_id
        eos = gc.eos_token_id if gc.eos_token_id is not None else tc.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = []
        for ids, keep in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            toks = [t for t, k in zip(ids, keep) if k]  # left or right padding alike
            if toks and toks[0] == bos:
                toks = toks[1:]
            if toks and toks[-1] == eos:
                toks = toks[:-1]
            rows.append([bos, *toks, eos])
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=input_ids.device)  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=input_ids.device)
        return ids, mask


def write_hub_files(folder) -> None:
    """preprocessor_config.json, which transformers' AutoImageProcessor needs to find a folder's image
    processor (the zero-shot-image-classification pipeline loads one); written next to the model card."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.exists():
        path.write_text(json.dumps({"processor_class": "MMGPTHFProcessor", "note": "mmgpt reads "
                                    "mmgpt_processor.json; this file lets transformers' Auto classes find it"},
                                   indent=2) + "\n")


_REGISTERED = False


def register() -> None:
    """Make transformers' Auto classes (and so its pipelines) know model_type "mmgpt". Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageTextToText,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
    )

    from mmgpt.config import MMGPTConfig

    AutoConfig.register("mmgpt", MMGPTConfig, exist_ok=True)
    AutoModel.register(MMGPTConfig, MMGPTModel, exist_ok=True)
    AutoModelForImageTextToText.register(MMGPTConfig, MMGPTModel, exist_ok=True)
    AutoProcessor.register(MMGPTConfig, MMGPTHFProcessor, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(MMGPTConfig, MMGPTForZeroShotImageClassification, exist_ok=True)
    try:
        AutoImageProcessor.register(MMGPTConfig, image_processor_classes={"pil": MMGPTImageProcessor,
                                                                          "torchvision": MMGPTImageProcessor},
                                    exist_ok=True)
    except TypeError:  # transformers releases before per-backend image processors
        AutoImageProcessor.register(MMGPTConfig, slow_image_processor_class=MMGPTImageProcessor, exist_ok=True)
    _REGISTERED = True
