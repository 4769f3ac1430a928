"""MMGPTProcessor: image transform + tokenizer + prompt templates, saved next to the model."""

from __future__ import annotations

import functools
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
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EOS = "<|endoftext|>"
IMAGE_TOKEN = "<image>"
DEFAULT_TEMPLATES = {"caption": "", "vqa": "question: {question} answer:"}

# mmgpt's own chat template. A user turn is its images' placeholders (prefix fusion; none for
# cross-attention, which reads the images beside the text), BOS, then the question template around its
# text (the caption template when it has none); an assistant turn is its text (after a space when something
# was asked) and EOS. So a caption or VQA record is exactly its one-turn conversation, token for token.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set ns = namespace(prompt='') -%}"
    "{%- for message in messages -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | map('trim') | reject('equalto', '') | join(' ') -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ bos_token }}{{ text }}{{ eos_token }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ image_token }}{%- endfor -%}"
    "{%- set ns.prompt = (question_prefix ~ text ~ question_suffix) if text else caption_prompt -%}"
    "{{ bos_token }}{{ ns.prompt }}"
    "{%- else -%}"
    "{%- if ns.prompt %} {% endif -%}{{ text }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


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
        chat_template: str | None = None,
        image_token: str | None = None,
        num_image_tokens: int = 0,
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
        # chat: the Jinja template (None = mmgpt's own), and for prefix fusion the placeholder of an image
        # in the text with the K tokens each image becomes (cross-attention: no placeholder)
        self.chat_template = chat_template
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        if "{question}" not in self.templates["vqa"]:
            raise ValueError(f"templates.vqa {self.templates['vqa']!r} has no {{question}} field")
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

    def example_pairs(self, tasks: Sequence[str], prompts: Sequence[str], targets: Sequence[str]
                      ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of many caption / VQA records, tokenized in one call."""
        _same_lengths(tasks=tasks, prompts=prompts, targets=targets)
        heads = self._prompt_ids(tasks, prompts)
        tails = self._encode_many([self._target_text(t, y) for t, y in zip(tasks, targets)])
        return [self._join(p, t) for p, t in zip(heads, tails)]

    def pad_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> dict:
        """Right-padded training batch of (input_ids, labels) pairs: input_ids, attention_mask, labels (B, T)."""
        return {"input_ids": self.pad([p[0] for p in pairs]), "attention_mask": self.pad(
            [[1] * len(p[0]) for p in pairs], value=0), "labels": self.pad([p[1] for p in pairs], value=-100)}

    def batch_examples(self, tasks: Sequence[str], prompts: Sequence[str], targets: Sequence[str]) -> dict:
        """Right-padded training batch: input_ids, attention_mask, labels (B, T)."""
        pairs = self.example_pairs(tasks, prompts, targets)
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

    # --- conversations ---------------------------------------------------------------------------

    @property
    def image_token_id(self) -> int | None:
        return None if self.image_token is None else self.tokenizer.convert_tokens_to_ids(self.image_token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Normalized messages -> the template's text (images as placeholders where the model has them)."""
        return _render(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt,
                       own=self.chat_template is None, bos_token=self.tokenizer.decode([self.bos_id]),
                       eos_token=self.tokenizer.eos_token, image_token=self.image_token or "",
                       caption_prompt=self.templates["caption"],
                       question_prefix=self.templates["vqa"].split("{question}")[0],
                       question_suffix=self.templates["vqa"].split("{question}")[1])

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `text` (the whole conversation rendered): each runs
        from the end of the conversation before it, with the generation prompt, to the end of the conversation
        through it, so it holds the turn's text and its end-of-turn tokens."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_chat(messages[:i], add_generation_prompt=True)
            through = self.render_chat(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError("the chat template does not render a conversation as the start of a longer one: "
                                 "the assistant turns cannot be found for the loss")
            spans.append((len(before), len(through)))
        return spans

    def encode_conversation(self, messages: list[dict], add_generation_prompt: bool = False,
                            max_length: int | None = None) -> tuple[list[int], list[int]]:
        """Normalized messages (mmgpt.conversation.normalize) -> (input_ids, labels): labels keep the
        assistant turns (their text and end-of-turn tokens) and are -100 everywhere else. With prefix fusion
        each image placeholder becomes `num_image_tokens` copies of it. Cut at `max_length` (default: the
        processor's, plus the image tokens); a cut inside an image's tokens is a ValueError."""
        text = self.render_chat(messages, add_generation_prompt)
        spans = self._assistant_spans(messages, text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        ph = self.image_token_id
        k = self.num_image_tokens
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if ph is not None and tok == ph:
                ids += [tok] * k
                labels += [-100] * k
                continue
            ids.append(tok)
            inside = any(s <= a < e for s, e in spans) and b > a
            labels.append(tok if inside else -100)
        limit = max_length or (self.max_length + (k * _count_images(messages) if ph is not None else 0))
        if len(ids) > limit:
            if ph is not None and ph in ids[limit:]:
                raise ValueError(f"the conversation takes {len(ids)} tokens and its images do not fit the "
                                 f"{limit} this model reads")
            ids, labels = ids[:limit], labels[:limit]
        return ids, labels

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = None, images=None,
                            return_assistant_tokens_mask: bool = False, **kwargs):
        """As transformers' processors: messages (one conversation, or a list of them) -> the rendered text
        (`tokenize=False`), token ids, or with `return_dict=True` a dict of input_ids, attention_mask (left
        padded, for generation), pixel_values and image_slots of the conversations' images, and
        `assistant_masks` when asked. Image parts may carry their image, or take `images` in order."""
        from mmgpt.conversation import normalize

        if kwargs.get("chat_template") is not None:
            raise ValueError("chat_template= is not taken here: set processor.chat_template")
        batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batched else [messages]
        if images is not None and not batched:
            images = [images]
        normed = [normalize(c, images[i] if images is not None else None) for i, c in enumerate(convs)]
        if not tokenize:
            texts = [self.render_chat(m, add_generation_prompt) for m, _ in normed]
            return texts if batched else texts[0]
        # a generation prompt is never cut (its end is the question): generate() says when it does not fit
        limit = (1 << 30) if add_generation_prompt else None
        enc = [self.encode_conversation(m, add_generation_prompt, max_length=limit) for m, _ in normed]
        if not return_dict and return_tensors is None:
            ids = [e[0] for e in enc]
            return ids if batched else ids[0]
        out = {"input_ids": self.pad([e[0] for e in enc], side="left"),
               "attention_mask": self.pad([[1] * len(e[0]) for e in enc], side="left", value=0)}
        if return_assistant_tokens_mask:
            out["assistant_masks"] = self.pad([[int(x != -100) for x in e[1]] for e in enc], side="left", value=0)
        all_images = [im for _, ims in normed for im in ims]
        if all_images:
            out["pixel_values"] = self.images(all_images)
            out["image_slots"] = image_slots([len(ims) for _, ims in normed])
        if not return_dict:
            return out["input_ids"]
        return out

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
            "image_token": self.image_token,
            "num_image_tokens": self.num_image_tokens,
        }

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        (path / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        # the chat template in use, always written (transformers' file name), so other tools can read it
        (path / CHAT_TEMPLATE_FILE).write_text((self.chat_template or DEFAULT_CHAT_TEMPLATE) + "\n")

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
        tpl = path / CHAT_TEMPLATE_FILE
        if "chat_template" not in kwargs and tpl.is_file():  # folders before conversations have none: the default
            text = tpl.read_text().rstrip("\n")
            data["chat_template"] = None if text == DEFAULT_CHAT_TEMPLATE else text
        return cls(tokenizer, **data)


def _same_lengths(**seqs: Sequence) -> None:
    """A ValueError naming the lists when they differ in length (zip would drop rows silently)."""
    lengths = {name: len(v) for name, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("lists of different lengths: " + ", ".join(f"{k} {n}" for k, n in lengths.items()))
    if not next(iter(lengths.values())):
        raise ValueError("empty batch: give at least one row")


def image_slots(counts: Sequence[int]) -> torch.Tensor:
    """Images per conversation, numbered in order across the batch -> (B, M) slots, -1 past a row's own."""
    width = max(1, max(counts))
    rows, start = [], 0
    for n in counts:
        rows.append(list(range(start, start + n)) + [-1] * (width - n))
        start += n
    return torch.tensor(rows, dtype=torch.long)


def _count_images(messages: list[dict]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render(template: str, messages: list[dict], add_generation_prompt: bool, own: bool, **variables) -> str:
    """Render a chat template in jinja2's sandbox, as transformers does. A template of another model (SmolLM2,
    Qwen2.5: content as one string) gets each message's parts flattened to text with the image placeholders
    where the images stand."""
    if not own:
        ph = variables.get("image_token", "")
        messages = [{"role": m["role"], "content": "".join(
            ph if p["type"] == "image" else p["text"] for p in m["content"])} for m in messages]
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **variables)
