"""MMGPTProcessor: image transform + tokenizer + prompt templates, saved next to the model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from encoders import build_image_transform, load_image
from encoders.image_io import is_array

PROCESSOR_FILE = "mmgpt_processor.json"
EOS = "<|endoftext|>"
DEFAULT_TEMPLATES = {"caption": "", "vqa": "question: {question} answer:"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on `texts` with the `tokenizers` library.

    `<|endoftext|>` is BOS, EOS and PAD, as in GPT-2; byte fallback means any text still encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


class MMGPTProcessor:
    """Turns images and texts into model inputs, and generated ids back into text.

    A training sequence is `[BOS] prompt target [EOS]`; LM labels keep only `target [EOS]`.
    Captions have an empty prompt; a question becomes `question: {q} answer:` and its answer
    follows after a space.
    """

    def __init__(
        self,
        tokenizer,
        image_size: int = 224,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        templates: dict | None = None,
        max_length: int = 64,
        train_scale: Sequence[float] = (0.8, 1.0),
    ):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.templates = {**DEFAULT_TEMPLATES, **(templates or {})}
        self.max_length = int(max_length)
        self.train_scale = tuple(train_scale)
        self.eval_transform = build_image_transform(self.image_size, self.image_mean, self.image_std, train=False)
        self.train_transform = build_image_transform(
            self.image_size, self.image_mean, self.image_std, train=True, scale=self.train_scale
        )

    # --- ids -------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def prompt_text(self, task: str, prompt: str = "") -> str:
        if task == "caption":
            return self.templates["caption"]
        if task == "vqa":
            return self.templates["vqa"].format(question=prompt.strip())
        raise ValueError(f"task {task!r} is unknown: use 'caption' or 'vqa'")

    def encode_prompt(self, task: str, prompt: str = "") -> list[int]:
        text = self.prompt_text(task, prompt)
        return [self.bos_id] + (self.tokenizer.encode(text, add_special_tokens=False) if text else [])

    def _target_text(self, task: str, target: str) -> str:
        t_text = target.strip()
        if task == "vqa" or (self.templates["caption"] and task == "caption"):
            t_text = " " + t_text
        return t_text

    def _join(self, p: list[int], t: list[int]) -> tuple[list[int], list[int]]:
        t = t + [self.eos_id]
        return (p + t)[: self.max_length], ([-100] * len(p) + t)[: self.max_length]

    def encode_example(self, task: str, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """-> (input_ids, labels) for one record; labels are -100 over BOS and prompt."""
        t = self.tokenizer.encode(self._target_text(task, target), add_special_tokens=False)
        return self._join(self.encode_prompt(task, prompt), t)

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts in one tokenizer call (the per-text call's Python overhead was 40%
        of the shapes data path); an empty text gives []."""
        todo = [i for i, x in enumerate(texts) if x]
        out: list[list[int]] = [[] for _ in texts]
        if todo:
            enc = self.tokenizer([texts[i] for i in todo], add_special_tokens=False)["input_ids"]
            for i, ids in zip(todo, enc):
                out[i] = list(ids)
        return out

    def pad(self, seqs: list[list[int]], side: str = "right", value: int | None = None) -> torch.Tensor:
        value = self.pad_id if value is None else value
        width = max(len(s) for s in seqs)
        fill = [value] * width
        if side == "right":
            rows = [s + fill[len(s):] for s in seqs]
        else:
            rows = [fill[len(s):] + s for s in seqs]
        return torch.tensor(rows, dtype=torch.long)

    def batch_examples(self, tasks: Sequence[str], prompts: Sequence[str], targets: Sequence[str]) -> dict:
        """Right-padded training batch: input_ids, attention_mask, labels (B, T)."""
        _same_lengths(tasks=tasks, prompts=prompts, targets=targets)
        heads = self._prompt_ids(tasks, prompts)
        tails = self._encode_many([self._target_text(t, y) for t, y in zip(tasks, targets)])
        pairs = [self._join(p, t) for p, t in zip(heads, tails)]
        ids = self.pad([p[0] for p in pairs])
        labels = self.pad([p[1] for p in pairs], value=-100)
        mask = self.pad([[1] * len(p[0]) for p in pairs], value=0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _prompt_ids(self, tasks: Sequence[str], prompts: Sequence[str]) -> list[list[int]]:
        """encode_prompt for many records, the distinct prompt texts tokenized once."""
        texts = [self.prompt_text(t, p) for t, p in zip(tasks, prompts)]
        distinct = list(dict.fromkeys(texts))
        ids = dict(zip(distinct, self._encode_many(distinct)))
        bos = self.bos_id
        return [[bos] + ids[x] for x in texts]

    def batch_prompts(self, tasks: Sequence[str], prompts: Sequence[str]) -> dict:
        """Left-padded generation prompts: input_ids, attention_mask (B, T)."""
        _same_lengths(tasks=tasks, prompts=prompts)
        seqs = self._prompt_ids(tasks, prompts)
        return {
            "input_ids": self.pad(seqs, side="left"),
            "attention_mask": self.pad([[1] * len(s) for s in seqs], side="left", value=0),
        }

    def batch_texts(self, texts: Sequence[str]) -> dict:
        """Texts to embed (retrieval): `[BOS] text [EOS]`, right-padded, as captions are in training."""
        return self.batch_examples(["caption"] * len(texts), [""] * len(texts), list(texts))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row up to its first EOS. Leading BOS / padding are skipped first, so a whole
        generate() output decodes too (BOS, EOS and padding share one id in GPT-2's vocabulary)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        lead = {self.bos_id, self.pad_id}
        start = 0
        while start < len(ids) and ids[start] in lead:
            start += 1
        ids = ids[start:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        """Rows (B, T) -> B texts (a single row (T,) gives one text in a list)."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 1:
            ids = ids.unsqueeze(0)
        return [self.decode(row) for row in ids]

    # --- images ----------------------------------------------------------------------------------

    def images(self, images: Sequence, train: bool = False) -> torch.Tensor:
        """Paths, bytes, PIL images or arrays / tensors (or one of them; a 4-D array is a batch)
        -> (B, 3, S, S) float tensor."""
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or hasattr(images, "read"):
            images = [images]
        elif is_array(images):  # one image (H, W[, C]) / (C, H, W), or a batch (B, ...) of them
            images = [images] if images.ndim <= 3 else list(images)
        images = list(images)
        if not images:
            raise ValueError("no images given")
        return self.pixel_values([load_image(im) for im in images], train=train)

    def pixel_values(self, images: Sequence, train: bool = False) -> torch.Tensor:
        """RGB PIL images -> (B, 3, S, S). Images already S x S skip resize and crop (identities for
        them) and are normalised as one batch: the same numbers as the eval transform, ~7x faster."""
        s = self.image_size
        if train or any(im.size != (s, s) or im.mode != "RGB" for im in images):
            tf = self.train_transform if train else self.eval_transform
            return torch.stack([tf(im) for im in images])
        u8 = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # (B, S, S, 3) uint8
        x = u8.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) in [0, 1]
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def __call__(self, images=None, text=None, task: str | None = None, train: bool = False) -> dict:
        """`images` -> pixel_values; `text` -> left-padded prompts of `task` (default: "vqa" when a text
        is given, i.e. questions; a caption prompt takes no text)."""
        out = {}
        if images is not None:
            out["pixel_values"] = self.images(images if isinstance(images, (list, tuple)) else [images], train)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            out.update(self.batch_prompts([task or "vqa"] * len(texts), texts))
        return out

    # --- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "templates": self.templates,
            "max_length": self.max_length,
            "train_scale": list(self.train_scale),
        }

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        (path / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> MMGPTProcessor:
        path = Path(path)
        cfg_file = path / PROCESSOR_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no {PROCESSOR_FILE}; is this an mmgpt model folder?")
        data = json.loads(cfg_file.read_text())
        data.pop("processor_class", None)
        data.update(kwargs)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        return cls(tokenizer, **data)


def _same_lengths(**seqs: Sequence) -> None:
    """A ValueError naming the lists when they differ in length (zip would drop rows silently)."""
    lengths = {name: len(v) for name, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("lists of different lengths: " + ", ".join(f"{k} {n}" for k, n in lengths.items()))
    if not next(iter(lengths.values())):
        raise ValueError("empty batch: give at least one row")
