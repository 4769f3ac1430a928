"""Chat with a model: answers to conversations, whole or streamed, with the past reused across turns.

A follow-up turn costs only its own tokens: after each answer the engine keeps the conversation's token ids,
its images' memory (encoder and adapter output) and the decoder's cache (self-attention keys and values of
every past token; cross-attention's of the images). A later call whose images are the same and whose tokens
start with kept ones feeds only the rest (the longest common start, as vLLM's prefix caching does): no
image is encoded again and no past token runs again. Calls stay stateless for the caller, so the same
messages give the same answer with or without the kept state (tested), and a server gets it for free.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mmgpt.conversation import ConversationError, normalize
from mmgpt.processor import image_slots
from mmgpt.speed.decode import KeptCache


@dataclass
class _Kept:
    ids: list[int]  # the conversation's tokens so far (prompt and answer)
    cache: object  # the decoder's cache: every token of `ids` but the last
    memory: torch.Tensor  # (1, Kmem, D)
    memory_mask: torch.Tensor | None


@dataclass
class ChatTurn:
    """What one answer took: tokens read from the kept state, tokens run, tokens generated."""

    text: str
    prompt_tokens: int
    reused_tokens: int
    completion_tokens: int
    images_encoded: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens)


class ChatStream:
    """The text pieces of one streamed answer (an iterator of str); `turn` is its ChatTurn once the pieces
    have run out (None before, or when generation failed)."""

    def __init__(self, pieces: Iterator[str], done: list):
        self._pieces, self._done = pieces, done

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def turn(self) -> ChatTurn | None:
        return self._done[0] if self._done else None


class ChatEngine:
    """Conversations for one `VisionLanguagePipeline` (`vl.chat`, `vl.stream_chat`, `vl.chat_batch`)."""

    def __init__(self, pipeline, keep: int = 8):
        self.vl = pipeline
        self.keep = keep
        self._kept: OrderedDict[tuple, list[_Kept]] = OrderedDict()
        self._lock = threading.Lock()
        self.last: ChatTurn | None = None  # the last answer's accounting (for tests and the server)

    # --- inputs ----------------------------------------------------------------------------------

    def _prepare(self, messages, images, gen: dict):
        vl = self.vl
        msgs, imgs = normalize(messages, images)
        if msgs[-1]["role"] == "assistant":
            raise ConversationError("the conversation ends with an assistant turn: add the user's next message")
        if not imgs:
            raise ConversationError("a conversation needs at least one image (an image part in a user turn)")
        ids, _ = vl.processor.encode_conversation(msgs, add_generation_prompt=True, max_length=1 << 30)
        pixels = vl.pixels(imgs)  # (N, 3, S, S); an unreadable image raises ImageLoadError naming it
        digest = (hashlib.sha1(pixels.float().cpu().numpy().tobytes()).hexdigest(), len(imgs))
        return ids, pixels, digest

    def _take(self, digest: tuple, ids: list[int]) -> tuple[_Kept | None, int]:
        """The kept state of these images whose tokens share the longest start with `ids`, taken out (its cache
        is extended in place by the next answer), and how many of its tokens to reuse."""
        with self._lock:
            entries = self._kept.get(digest) or []
            best, best_n = None, 0
            for e in entries:
                n = 0
                for a, b in zip(e.ids, ids):
                    if a != b:
                        break
                    n += 1
                if n > best_n:
                    best, best_n = e, n
            if best is None:
                return None, 0
            entries.remove(best)
        # the cache holds all kept tokens but the last; at least one token of `ids` must still run
        have = best.cache.get_seq_length()
        reuse = min(best_n, have, len(ids) - 1)
        if reuse <= 0:
            return None, 0
        if reuse < have:
            best.cache.crop(reuse - have)  # transformers 5: a negative count of tokens to drop
        return best, reuse

    def _put(self, digest: tuple, kept: _Kept) -> None:
        with self._lock:
            entries = self._kept.setdefault(digest, [])
            entries.append(kept)
            self._kept.move_to_end(digest)
            while sum(len(v) for v in self._kept.values()) > self.keep:
                oldest = next(iter(self._kept))
                self._kept[oldest].pop(0)
                if not self._kept[oldest]:
                    del self._kept[oldest]

    def reset(self) -> None:
        """Forget every kept conversation."""
        with self._lock:
            self._kept.clear()

    # --- answers ---------------------------------------------------------------------------------

    def _generate(self, messages, images, gen: dict, streamer=None) -> ChatTurn:
        vl, model = self.vl, self.vl.model
        gen = vl._gen_kwargs(gen)
        ids, pixels, digest = self._prepare(messages, images, gen)
        fast = self._fast(gen)
        kept, reuse = self._take(digest, ids) if gen.get("num_beams", 1) == 1 else (None, 0)
        if kept is not None and isinstance(kept.cache, KeptCache) != fast:  # kept by the other loop: start over
            kept, reuse = None, 0
        with torch.inference_mode():
            if kept is None:
                slots = image_slots([pixels.shape[0]]).to(vl.device)
                memory, memory_mask = model.memory_from_pixels(pixels, slots)  # (1, Kmem, D)
                cache = None
            else:
                memory, memory_mask, cache = kept.memory, kept.memory_mask, kept.cache
            fast = fast and (memory_mask is None or bool(memory_mask.all()))  # the fast loop reads every image token
            if fast:
                seq, cache = self._fast_generate(ids, memory, cache, reuse, gen, streamer)
            else:
                input_ids = torch.tensor([ids], device=vl.device)
                out = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), encoder_hidden_states=memory,
                    memory_mask=memory_mask, cache=cache, return_dict_in_generate=True, streamer=streamer,
                    fast=False, **gen)  # GenerationMixin: it hands back the cache to keep
                seq, cache = out.sequences[0].tolist(), out.cache
        new = seq[len(ids):]
        eos = vl.processor.eos_id
        finished = eos in new
        if cache is not None:
            self._put(digest, _Kept(ids=seq, cache=cache, memory=memory, memory_mask=memory_mask))
        turn = ChatTurn(text=vl.processor.decode(new), prompt_tokens=len(ids), reused_tokens=reuse,
                        completion_tokens=(new.index(eos) + 1) if finished else len(new),
                        images_encoded=0 if kept is not None else pixels.shape[0],
                        finish_reason="stop" if finished else "length")
        self.last = turn
        return turn

    def _fast(self, gen: dict) -> bool:
        """Whether this answer takes the fast decoding loop (`mmgpt.speed.decode`): greedy or plain sampling
        on a cross-attention GPT-2 decoder, as `generate` decides."""
        model = self.vl.model
        return not getattr(model, "uses_prefix", False) and model._can_use_fast_path(dict(gen))

    def _fast_generate(self, ids: list[int], memory, kept_cache, reuse: int, gen: dict, streamer):
        """The answer through the fast loop, fed only the tokens after the `reuse` kept ones;
        -> (the conversation's tokens with the answer, the KeptCache to keep)."""
        from mmgpt.speed.decode import greedy_generate, loop_options

        model = self.vl.model
        gen = {**gen, "streamer": streamer}
        model._fit_positions(torch.ones(1, len(ids), dtype=torch.long), memory.shape[1], gen)  # cuts max_new_tokens
        new_ids = torch.tensor([ids[reuse:]], device=self.vl.device)
        out, cache = greedy_generate(model, memory, new_ids, torch.ones_like(new_ids), past=kept_cache, keep=True,
                                     **loop_options(gen, model.generation_config))
        return ids + out[0, new_ids.shape[1]:].tolist(), cache

    def chat(self, messages, images=None, **gen) -> str:
        return self._generate(messages, images, gen).text

    def answer(self, messages, images=None, **gen) -> ChatTurn:
        """`chat`, with its accounting: the ChatTurn of this answer (not another thread's, as `last` may be)."""
        return self._generate(messages, images, gen)

    def stream(self, messages, images=None, **gen) -> ChatStream:
        from transformers import TextIteratorStreamer

        if gen.get("num_beams", 1) != 1:
            raise ValueError("streaming needs num_beams=1 (beam search settles its tokens only at the end)")
        self._prepare(messages, images, gen)  # bad messages and images fail here, in the caller's thread
        streamer = TextIteratorStreamer(self.vl.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        done: list[ChatTurn] = []

        def work():
            try:
                done.append(self._generate(messages, images, gen, streamer=streamer))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return ChatStream(self.vl._tidy_stream(streamer, thread, failure), done)

    def batch(self, conversations: Sequence, gen: dict) -> list[str]:
        """Several conversations (each messages, or (messages, images)) in one generate call, left-padded,
        rows with different numbers of images side by side (no state kept: the dynamic batcher's path)."""
        return [turn.text for turn in self.batch_turns(conversations, gen)]

    @torch.inference_mode()
    def batch_turns(self, conversations: Sequence, gen: dict) -> list[ChatTurn]:
        """`batch`, with each row's accounting (reused_tokens 0: a batch keeps no state)."""
        vl = self.vl
        gen = vl._gen_kwargs(gen, len(conversations))
        normed = []
        for c in conversations:
            msgs, imgs = (c if isinstance(c, tuple) else (c, None))
            m, ims = normalize(msgs, imgs)
            if not ims:
                raise ConversationError("a conversation needs at least one image (an image part in a user turn)")
            normed.append((m, ims))
        enc = [vl.processor.encode_conversation(m, add_generation_prompt=True, max_length=1 << 30)[0]
               for m, _ in normed]
        p = vl.processor
        ids = p.pad(enc, side="left").to(vl.device)
        mask = p.pad([[1] * len(e) for e in enc], side="left", value=0).to(vl.device)
        pixels = vl.pixels([im for _, ims in normed for im in ims])
        slots = image_slots([len(ims) for _, ims in normed]).to(vl.device)
        out = vl.model.generate(pixel_values=pixels, image_slots=slots, input_ids=ids, attention_mask=mask, **gen)
        texts = p.batch_decode(out[:, ids.shape[1]:])
        turns = []
        for e, (_, ims), text, new in zip(enc, normed, texts, out[:, ids.shape[1]:].tolist()):
            finished = p.eos_id in new
            turns.append(ChatTurn(text=text, prompt_tokens=len(e), reused_tokens=0,
                                  completion_tokens=(new.index(p.eos_id) + 1) if finished else len(new),
                                  images_encoded=len(ims), finish_reason="stop" if finished else "length"))
        return turns
