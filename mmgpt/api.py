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

import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from encoders import ImageLoadError, load_image
from encoders.image_io import is_array
from mmgpt.model import MMGPTModel
from mmgpt.processor import PROCESSOR_FILE, MMGPTProcessor

GENERATION_DEFAULTS = {"max_new_tokens": 32, "num_beams": 1}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILE = "tokenizer.json"  # what MMGPTProcessor.from_pretrained reads (a fast tokenizer)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"

__all__ = [
    "GENERATION_DEFAULTS",
    "ImageLoadError",
    "ModelLoadError",
    "VisionLanguagePipeline",
    "check_generation_options",
    "load",
]


class ModelLoadError(ValueError):
    """A model folder (or hub id) is missing or is not a usable mmgpt model; one readable line."""


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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A local folder, or a hub id fetched (or found in the cache) with `huggingface_hub`."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{path}: is a file, not a model folder (expected the folder save_pretrained wrote)")
    spec = os.fspath(path)
    if not HUB_ID.fullmatch(spec):
        raise ModelLoadError(f"{path}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec))
    except Exception as err:  # noqa: BLE001 - any hub failure is one readable line
        raise ModelLoadError(
            f"{path}: no such model folder, and it could not be fetched from the Hugging Face Hub ({_one_line(err)})"
        ) from None


def check_model_folder(folder: Path, name: str) -> None:
    """Raise ModelLoadError naming what a model folder lacks, before transformers sees it."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{name}: not an mmgpt model folder (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{name}: config.json is unreadable ({_one_line(err)})") from None
    if model_type != "mmgpt":
        raise ModelLoadError(f"{name}: config.json is for model type {model_type!r}, not an mmgpt model")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{name}: no weights (expected {WEIGHT_FILES[0]})")
    for fname in (PROCESSOR_FILE, TOKENIZER_FILE):  # both written by processor.save_pretrained
        path = folder / fname
        if not path.is_file():
            raise ModelLoadError(f"{name}: no {fname} (save the processor into the folder with "
                                 f"processor.save_pretrained)")
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{name}: {fname} is unreadable ({_one_line(err)}); save the processor "
                                 f"again with processor.save_pretrained") from None


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
            raise ModelLoadError(f"{path}: could not load the model ({_one_line(err)})") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers would warn and go on with random weights
            raise ModelLoadError(
                f"{path}: the weights do not fit the config: {len(missing)} tensors missing, e.g. {missing[0]}"
            )
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"


def load(model_or_path, device=None, dtype=None, *, processor: MMGPTProcessor | None = None) -> VisionLanguagePipeline:
    """A pipeline from a model folder or hub id, or from a model object (with its processor)."""
    if isinstance(model_or_path, MMGPTModel):
        if processor is None:
            source = getattr(model_or_path, "name_or_path", "")
            if not source:
                raise ValueError("load(model) needs processor=... when the model was not loaded from a folder")
            processor = MMGPTProcessor.from_pretrained(source)
        return VisionLanguagePipeline(model_or_path, processor, device=device, dtype=dtype)
    return VisionLanguagePipeline.from_pretrained(model_or_path, device=device, dtype=dtype)
