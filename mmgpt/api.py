"""Use a trained model: caption, ask, embed, compare and stream, with one object loaded once.

    >>> from mmgpt.api import load
    >>> vl = load("runs/shapes/final")
    >>> vl.caption("photo.png")
    'a large red circle'
    >>> vl.ask(["a.png", "b.png"], "what color is the circle?")
    ['red', 'blue']
    >>> vl.similarity(["a.png", "b.png"], ["a red circle", "a blue square"])  # (2, 2) cosine

Images may be paths, raw bytes, binary files or PIL images; one that cannot be read raises
`encoders.ImageLoadError` whose message starts with the file name. Generation options
(`max_new_tokens`, `num_beams`, `do_sample`, ...) pass through to `MMGPTModel.generate`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from encoders import ImageLoadError, load_image
from encoders.image_io import is_array
from mmgpt.folders import (
    ModelLoadError,
    check_loaded,
    check_model_folder,
    one_line,
    resolve_model_folder,
    shape_mismatches,
)
from mmgpt.model import MMGPTModel
from mmgpt.processor import MMGPTProcessor

GENERATION_DEFAULTS = {"max_new_tokens": 32, "num_beams": 1}

__all__ = [
    "GENERATION_DEFAULTS",
    "ImageLoadError",
    "ModelLoadError",
    "VisionLanguagePipeline",
    "check_generation_options",
    "load",
]


def is_single_image(x: Any) -> bool:
    """A path, bytes, file object, PIL image or one array / tensor (at most 3-D), as opposed to a list
    (or a 4-D batch) of them."""
    if is_array(x):
        return x.ndim <= 3
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or hasattr(x, "read")


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":  # auto: as saved
        return None if dtype == "auto" else dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in names:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(names)}")
    return names[str(dtype)]


def _check_count(name: str, value: Any) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_generation_options(gen: dict, batch_size: Any = 1) -> None:
    """Raise a ValueError naming the option, before any work, for a ``batch_size``, ``num_beams``,
    ``max_new_tokens`` or ``num_return_sequences`` that is not an integer >= 1 (a width of 0 would
    otherwise end in a bare ZeroDivisionError deep inside generation)."""
    _check_count("batch_size", batch_size)
    for name in ("num_beams", "max_new_tokens", "num_return_sequences"):
        if gen.get(name) is not None:
            _check_count(name, gen[name])


class VisionLanguagePipeline:
    """A model and its processor in eval mode on one device; every method works in batches."""

    def __init__(self, model: MMGPTModel, processor: MMGPTProcessor, device=None, dtype=None):
        dtype = _resolve_dtype(dtype)
        if device is None:
            device = next(model.parameters()).device
        self.model = model.to(device=device, dtype=dtype).eval() if dtype else model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> VisionLanguagePipeline:
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r}: no CUDA GPU is available here; use device='cpu'")
        folder = resolve_model_folder(path)
        check_model_folder(folder, os.fspath(path))
        try:
            model, info = MMGPTModel.from_pretrained(folder, output_loading_info=True)
            processor = MMGPTProcessor.from_pretrained(folder)
        except Exception as err:  # noqa: BLE001 - a broken folder is one readable line, not a traceback
            if "ignore_mismatched_sizes" in str(err):  # transformers: "... look at the above report!"
                try:
                    shapes = shape_mismatches(folder)
                except Exception:  # noqa: BLE001 - the plain message below then
                    shapes = []
                if shapes:
                    raise ModelLoadError(f"{path}: the weights do not fit config.json: {len(shapes)} tensors have "
                                         f"other shapes, e.g. {shapes[0]}; config.json does not describe the model "
                                         "these weights were saved from (was it edited?)") from None
            raise ModelLoadError(f"{path}: could not load the model ({one_line(err)})") from None
        check_loaded(model, processor, info, path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, processor, device=device, dtype=dtype)

    # --- inputs ----------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixels(self, images: Sequence) -> torch.Tensor:
        """Images -> (B, 3, S, S) on the model's device and dtype; ImageLoadError names a bad file."""
        return self.processor.images(list(images)).to(self.device, self.dtype)

    def _gen_kwargs(self, gen: dict, batch_size: Any = 1) -> dict:
        # the model's saved generation_config first (as transformers' pipelines), then ours, then the call's
        gc = self.model.generation_config
        saved = {k: getattr(gc, k, None) for k in GENERATION_DEFAULTS}
        kw = {**GENERATION_DEFAULTS, **{k: v for k, v in saved.items() if v is not None}, **gen}
        check_generation_options(kw, batch_size)
        if kw.get("num_return_sequences", 1) != 1:
            raise ValueError("num_return_sequences > 1 is not supported here; call model.generate directly")
        return kw

    @torch.inference_mode()
    def _generate(self, images: Sequence, tasks: Sequence[str], prompts: Sequence[str], gen: dict) -> list[str]:
        """One batch: left-padded prompts, generate, decode only the new tokens."""
        batch = self.processor.batch_prompts(tasks, prompts)
        ids = batch["input_ids"].to(self.device)  # (B, T)
        out = self.model.generate(
            pixel_values=self.pixels(images),
            input_ids=ids,
            attention_mask=batch["attention_mask"].to(self.device),
            **gen,
        )  # (B, T + new)
        return self.processor.batch_decode(out[:, ids.shape[1] :])

    def _run(self, images: list, tasks: list[str], prompts: list[str], batch_size: int, gen: dict) -> list[str]:
        gen = self._gen_kwargs(gen, batch_size)
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            j = i + batch_size
            out += self._generate(images[i:j], tasks[i:j], prompts[i:j], gen)
        return out

    # --- generation ------------------------------------------------------------------------------

    def caption(self, images, batch_size: int = 16, **gen) -> str | list[str]:
        """Caption one image (-> str) or a list of images (-> list[str])."""
        single = is_single_image(images)
        images = [images] if single else list(images)
        caps = self._run(images, ["caption"] * len(images), [""] * len(images), batch_size, gen)
        return caps[0] if single else caps

    def ask(self, images, questions: str | Sequence[str], batch_size: int = 16, **gen) -> str | list[str]:
        """Answer questions: one question for every image, one question per image, or several
        questions about one image. One image and one question -> str; else list[str]."""
        single_image, single_question = is_single_image(images), isinstance(questions, str)
        if single_image:
            image = load_image(images)  # read once, even when asked many questions
            images = [image] * (1 if single_question else len(questions))
        else:
            images = list(images)
        questions = [questions] * len(images) if single_question else list(questions)
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images: give one question, or one per image")
        answers = self._run(images, ["vqa"] * len(images), questions, batch_size, gen)
        return answers[0] if single_image and single_question else answers

    def stream_answer(self, image, question: str, **gen) -> Iterator[str]:
        """Yield the answer in pieces as it is generated; "".join(pieces) == ask(image, question)."""
        return self._stream(image, "vqa", question, gen)

    def stream_caption(self, image, **gen) -> Iterator[str]:
        """Yield the caption in pieces as it is generated; "".join(pieces) == caption(image)."""
        return self._stream(image, "caption", "", gen)

    def _stream(self, image, task: str, prompt: str, gen: dict) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        gen = self._gen_kwargs(gen)
        if gen.get("num_beams", 1) != 1:
            raise ValueError("streaming needs num_beams=1 (beam search settles its tokens only at the end)")
        pixel_values = self.pixels([image])  # load errors surface here, in the caller's thread
        batch = self.processor.batch_prompts([task], [prompt])
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    self.model.generate(
                        pixel_values=pixel_values,
                        input_ids=batch["input_ids"].to(self.device),
                        attention_mask=batch["attention_mask"].to(self.device),
                        streamer=streamer,
                        **gen,
                    )
            except BaseException as err:  # noqa: BLE001 - handed to the consumer below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return self._tidy_stream(streamer, thread, failure)

    @staticmethod
    def _tidy_stream(pieces, thread: threading.Thread, failure: list) -> Iterator[str]:
        """Drop leading whitespace and hold back trailing whitespace, as decode()'s strip() does."""
        started, held = False, ""
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if not piece:
                continue
            text = held + piece
            body = text.rstrip()
            held = text[len(body) :]
            if body:
                yield body
        thread.join()
        if failure:
            raise failure[0]

    # --- conversations ---------------------------------------------------------------------------

    @property
    def chats(self):
        """The `mmgpt.chat.ChatEngine` of this model: kept conversation state, the last answer's counts."""
        if getattr(self, "_chats", None) is None:
            from mmgpt.chat import ChatEngine

            self._chats = ChatEngine(self)
        return self._chats

    def chat(self, messages, images=None, **gen) -> str:
        """Answer a conversation (mmgpt.conversation: roles system / user / assistant, text and image parts;
        image parts carry their image or take ``images`` in order). A follow-up that repeats the earlier
        turns reuses their work: no image is encoded again, no past token runs again.

            >>> vl.chat([{"role": "user", "content": [{"type": "image", "image": "a.png"},
            ...                                        {"type": "text", "text": "what color is the circle?"}]}])
            'red'
        """
        return self.chats.chat(messages, images, **gen)

    def stream_chat(self, messages, images=None, **gen) -> Iterator[str]:
        """`chat`, in pieces as they are generated: "".join(pieces) == chat(messages)."""
        return self.chats.stream(messages, images, **gen)

    def chat_batch(self, conversations: Sequence, **gen) -> list[str]:
        """Answers to several conversations in one batch (each its messages, or (messages, images))."""
        return self.chats.batch(list(conversations), gen)

    # --- embeddings ------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_images(self, images, batch_size: int = 64) -> torch.Tensor:
        """-> (N, E) L2-normed image embeddings (float32, CPU)."""
        _check_count("batch_size", batch_size)
        images = [images] if is_single_image(images) else list(images)
        out = [self.model.embed_image(self.pixels(images[i : i + batch_size])).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """-> (N, E) L2-normed, image-free text embeddings (float32, CPU)."""
        _check_count("batch_size", batch_size)
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.processor.batch_texts(texts[i : i + batch_size])
            emb = self.model.embed_text(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            out.append(emb.float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    def similarity(self, images, texts: str | Sequence[str]) -> torch.Tensor:
        """-> (N_img, N_txt) cosine similarities."""
        return self.embed_images(images) @ self.embed_texts(texts).T  # (N_img, E) @ (E, N_txt)

    # CLIP's zero-shot recipe (Radford et al. 2021; open_clip's zero_shot_classifier): per label, the mean
    # of its L2-normed text embeddings under every template, normed again; softmax of scale * cosine.
    def classify(self, images, labels: Sequence[str], templates: Sequence[str] | None = None,
                 batch_size: int = 64) -> list[dict] | list[list[dict]]:
        """Zero-shot classification against ``labels``; ``templates`` are prompts with ``{}`` for the label
        (default: the label alone), averaged. One image -> ``[{"label", "score"}, ...]`` best first (the
        scores sum to 1); a list -> one such list per image (transformers' zero-shot-image-classification
        output)."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        templates = ["{}"] if templates is None else ([templates] if isinstance(templates, str) else list(templates))
        if not labels:
            raise ValueError("labels: give at least one label")
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(f"templates: {bad[0]!r} has no {{}} for the label" if bad else "templates is empty")
        texts = [t.replace("{}", lab) for lab in labels for t in templates]
        txt = self.embed_texts(texts).view(len(labels), len(templates), -1).mean(1)  # (L, T, E) -> (L, E)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        single = is_single_image(images)
        img = self.embed_images(images, batch_size=batch_size)  # (N, E)
        with torch.no_grad():
            scale = self.model.logit_scale.exp().clamp(max=self.model.config.logit_scale_max).float().cpu()
        probs = (scale * img @ txt.T).softmax(dim=-1)  # (N, L)
        ranked = [[{"label": labels[j], "score": float(row[j])} for j in torch.sort(row, descending=True, stable=True).indices]
                  for row in probs]
        return ranked[0] if single else ranked

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"


def load(model_or_path, device=None, dtype=None, *, processor: MMGPTProcessor | None = None,
         quantize: str | None = None) -> VisionLanguagePipeline:
    """A pipeline from a model folder or hub id, or from a model object (with its processor).

    quantize="int8": the decoder's and LM head's weights as int8 with per-output-channel scales, for
    faster decoding on the CPU (`mmgpt.speed.quantize`; the model's weights are rounded in place)."""
    from mmgpt.speed.quantize import check_mode, quantize_model

    check_mode(quantize)  # a bad value fails before any loading
    if isinstance(model_or_path, MMGPTModel):
        if processor is None:
            source = getattr(model_or_path, "name_or_path", "")
            if not source:
                raise ValueError("load(model) needs processor=... when the model was not loaded from a folder")
            processor = MMGPTProcessor.from_pretrained(source)
        pipe = VisionLanguagePipeline(model_or_path, processor, device=device, dtype=dtype)
    else:
        pipe = VisionLanguagePipeline.from_pretrained(model_or_path, device=device, dtype=dtype)
    quantize_model(pipe.model, quantize)
    return pipe
