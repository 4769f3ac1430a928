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

from mmgpt.onnx_export import MERGED_FILE, ONNX_FILES, cache_names


def _onnx_dir(folder: Path) -> Path:
    for d in (folder / "onnx", folder):
        if (d / ONNX_FILES[0]).is_file() and ((d / MERGED_FILE).is_file() or all((d / f).is_file() for f in ONNX_FILES)):
            return d
    raise FileNotFoundError(f"{folder}: no {ONNX_FILES[0]} with {MERGED_FILE} (or {ONNX_FILES[1]} and "
                            f"{ONNX_FILES[2]}); write them with `mmgpt export MODEL --format onnx --out DIR`")


class OnnxVisionLanguage:
    """onnxruntime sessions (the encoder, and the merged decoder or the decoder pair) and the processor saved
    beside them. `threads`: intra-op threads (None: onnxruntime's default). `merged`: run
    decoder_model_merged.onnx (None: where the export has it) or the pair."""

    def __init__(self, folder, threads: int | None = None, providers=("CPUExecutionProvider",),
                 merged: bool | None = None):
        import onnxruntime as ort

        from mmgpt.processor import MMGPTProcessor

        folder = Path(folder)
        onnx_dir = _onnx_dir(folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        def session(name):
            return ort.InferenceSession(os.fspath(onnx_dir / name), sess_options=opts, providers=list(providers))

        self.merged = (onnx_dir / MERGED_FILE).is_file() if merged is None else merged
        self.encoder = session(ONNX_FILES[0])
        if self.merged:
            self.decoder = self.decoder_with_past = session(MERGED_FILE)
            inputs = self.decoder.get_inputs()
            self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
            self.past_shape = {i.name: i.shape for i in inputs}  # (batch, H, seq, hd): H and hd fixed
        else:
            self.decoder, self.decoder_with_past = session(ONNX_FILES[1]), session(ONNX_FILES[2])
            self.past_names = [i.name for i in self.decoder_with_past.get_inputs()][2:]
        self.present_names = [o.name for o in self.decoder.get_outputs()][1:]
        self.processor = MMGPTProcessor.from_pretrained(folder)
        self._memory = None  # the merged graph reads encoder_hidden_states at every step

    # --- graphs ----------------------------------------------------------------------------------

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, K, D) cross-attention memory."""
        return self.encoder.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})[0]

    def first_step(self, input_ids, attention_mask, memory) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "encoder_hidden_states": memory}
        if self.merged:  # the past is read only on the cached branch: empty (B, H, 0, hd) tensors here
            b = input_ids.shape[0]
            feed.update({n: np.zeros((b, self.past_shape[n][1], 0, self.past_shape[n][3]), np.float32)
                         for n in self.past_names})
            feed["use_cache_branch"] = np.array([False])
            self._memory = memory
        out = self.decoder.run(None, feed)
        return out[0], out[1:]  # logits (B, T, V), presents

    def next_step(self, input_ids, attention_mask, cache) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        feed.update(zip(self.past_names, cache))
        if self.merged:
            feed["encoder_hidden_states"] = self._memory
            feed["use_cache_branch"] = np.array([True])
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
