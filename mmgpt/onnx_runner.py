"""Caption and answer with an ONNX export (`mmgpt export --format onnx`) on onnxruntime: greedy decoding
over the encoder / decoder / decoder-with-past graphs (mmgpt.onnx_export), fed by mmgpt's own processor.

    >>> from mmgpt.onnx_runner import OnnxVisionLanguage
    >>> vl = OnnxVisionLanguage("exported/")
    >>> vl.caption("photo.png")
    'a large red circle'
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmgpt.onnx_export import ONNX_FILES, cache_names


def _onnx_dir(folder: Path) -> Path:
    for d in (folder / "onnx", folder):
        if all((d / f).is_file() for f in ONNX_FILES):
            return d
    raise FileNotFoundError(f"{folder}: no {', '.join(ONNX_FILES)} (write them with `mmgpt export MODEL --format "
                            "onnx --out DIR`)")


class OnnxVisionLanguage:
    """Three onnxruntime sessions and the processor saved beside them. `threads`: intra-op threads (None:
    onnxruntime's default)."""

    def __init__(self, folder, threads: int | None = None, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        from mmgpt.processor import MMGPTProcessor

        folder = Path(folder)
        onnx_dir = _onnx_dir(folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.encoder, self.decoder, self.decoder_with_past = (
            ort.InferenceSession(os.fspath(onnx_dir / f), sess_options=opts, providers=list(providers))
            for f in ONNX_FILES)
        self.processor = MMGPTProcessor.from_pretrained(folder)
        self.past_names = [i.name for i in self.decoder_with_past.get_inputs()][2:]
        self.present_names = [o.name for o in self.decoder.get_outputs()][1:]

    # --- graphs ----------------------------------------------------------------------------------

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, K, D) cross-attention memory."""
        return self.encoder.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})[0]

    def first_step(self, input_ids, attention_mask, memory) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.decoder.run(None, {"input_ids": input_ids.astype(np.int64),
                                      "attention_mask": attention_mask.astype(np.int64),
                                      "encoder_hidden_states": memory})
        return out[0], out[1:]  # logits (B, T, V), presents

    def next_step(self, input_ids, attention_mask, cache) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        feed.update(zip(self.past_names, cache))
        out = self.decoder_with_past.run(None, feed)
        return out[0], out[1:]

    def generate(self, pixel_values, input_ids, attention_mask, max_new_tokens: int = 32,
                 eos_token_id: int | None = None) -> np.ndarray:
        """Greedy search as MMGPTModel.generate: -> (B, T + new) ids; finished rows are padded.
        `eos_token_id`: the id that ends a row (default the tokenizer's; -1: none, always max_new_tokens)."""
        eos = self.processor.eos_id if eos_token_id is None else eos_token_id
        pad = self.processor.pad_id if self.processor.pad_id is not None else eos
        memory = self.encode(np.asarray(pixel_values))
        ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
        if memory.shape[0] == 1 and ids.shape[0] > 1:
            memory = np.repeat(memory, ids.shape[0], axis=0)
        logits, cache = self.first_step(ids, mask, memory)
        done = np.zeros(ids.shape[0], dtype=bool)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            nxt = np.where(done, pad, nxt)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            done |= nxt == eos
            if done.all() or step == max_new_tokens - 1:
                break
            logits, presents = self.next_step(nxt[:, None], mask, cache)
            cache = presents
        return ids

    # --- tasks -----------------------------------------------------------------------------------

    def _run(self, images, tasks, prompts, max_new_tokens: int) -> list[str]:
        batch = self.processor.batch_prompts(tasks, prompts)
        ids = batch["input_ids"].numpy()
        out = self.generate(self.processor.images(images).numpy(), ids, batch["attention_mask"].numpy(),
                            max_new_tokens)
        return self.processor.batch_decode(out[:, ids.shape[1]:].tolist())

    def caption(self, images, max_new_tokens: int = 32):
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        caps = self._run(images, ["caption"] * len(images), [""] * len(images), max_new_tokens)
        return caps[0] if single else caps

    def ask(self, images, question: str, max_new_tokens: int = 32):
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        answers = self._run(images, ["vqa"] * len(images), [question] * len(images), max_new_tokens)
        return answers[0] if single else answers


__all__ = ["OnnxVisionLanguage", "cache_names"]
