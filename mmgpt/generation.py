"""Generation for `MMGPTModel`: the image is encoded once, then transformers' `GenerationMixin` runs (beam
search, sampling, streamers), or for greedy search and plain sampling our own loop (`mmgpt.speed.decode`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import GenerationMixin


class MMGPTGenerationMixin(GenerationMixin):
    """`generate` of `MMGPTModel` (reads `self.uses_prefix`, `self.decoder`, `self.memory_from_pixels`)."""

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, attention_mask=attention_mask, **kwargs)
        inputs.pop("pixel_values", None)  # the memory is computed once, in generate()
        return inputs

    def _fit_positions(self, attention_mask: torch.Tensor, n_memory: int, kwargs: dict) -> None:
        """A decoder with learned absolute positions (GPT-2: `n_positions`) has no embedding past its
        last: a prompt that needs more is a ValueError that says so, and `max_new_tokens` past the end
        is cut to what fits, with a warning (both ended in an IndexError deep inside before)."""
        tc = self.config.text_config
        limit = getattr(tc, "n_positions", None) if getattr(tc, "model_type", None) == "gpt2" else None
        if limit is None:
            trained = getattr(tc, "max_position_embeddings", None)  # rotary positions run on past it
            asked = kwargs.get("max_new_tokens") or 0
            if trained and attention_mask.numel():
                used = int(attention_mask.sum(dim=1).max()) + (n_memory if self.uses_prefix else 0) + int(asked)
                if used > trained:
                    warnings.warn(f"the image, prompt and answer take up to {used} positions and this decoder was "
                                  f"trained on {trained}: past them its output may degrade; shorten the question "
                                  "or max_new_tokens", stacklevel=3)
            return
        used = int(attention_mask.sum(dim=1).max()) + (n_memory if self.uses_prefix else 0)
        image = f" ({n_memory} of them the image's)" if self.uses_prefix else ""
        if used >= limit:
            raise ValueError(f"the prompt takes {used} positions{image}, and this decoder reads {limit}: no room "
                             "for an answer; shorten the question")
        room = limit - used
        if kwargs.get("max_new_tokens") is None and kwargs.get("max_length") is not None:
            total = limit - (n_memory if self.uses_prefix else 0)  # max_length counts the prompt's tokens
            if int(kwargs["max_length"]) > total:
                warnings.warn(f"max_length={kwargs['max_length']} cut to {total}: this decoder reads {limit} "
                              "positions", stacklevel=3)
                kwargs["max_length"] = total
        asked = kwargs.get("max_new_tokens")
        if asked is not None and int(asked) > room:
            warnings.warn(f"max_new_tokens={asked} cut to {room}: the prompt takes {used} of the {limit} positions "
                          "this decoder reads", stacklevel=3)
            kwargs["max_new_tokens"] = room
            if kwargs.get("min_new_tokens") and int(kwargs["min_new_tokens"]) > room:
                kwargs["min_new_tokens"] = room

    def _can_use_fast_path(self, kwargs: dict) -> bool:
        """Greedy search or temperature / top-k / top-p sampling with a cache: our own loop (mmgpt.speed.decode)
        gives the same tokens faster."""
        from mmgpt.speed.decode import FAST_OPTIONS, can_sample

        if self.uses_prefix:  # the fast loop reads GPT-2's cross-attention blocks
            return False
        tr = self.decoder.transformer  # LoRA on the blocks is folded in (mmgpt.speed.plan.weight_and_bias); on these it is not
        if type(self.decoder.lm_head) is not nn.Linear or type(tr.wte) is not nn.Embedding:
            return False
        if kwargs.get("fast") is False or self.training or not kwargs.get("max_new_tokens"):
            return False
        opts = {k for k, v in kwargs.items() if k != "fast" and v is not None}
        if not opts <= FAST_OPTIONS:
            return False
        gc = self.generation_config
        if kwargs.get("num_beams", gc.num_beams or 1) != 1:
            return False
        if kwargs.get("do_sample", gc.do_sample) and not can_sample(gc):
            return False
        if not kwargs.get("use_cache", True) or isinstance(kwargs.get("eos_token_id", gc.eos_token_id), list):
            return False
        plain = (gc.repetition_penalty in (None, 1.0) and not gc.min_new_tokens and not gc.min_length
                 and not gc.no_repeat_ngram_size and gc.bad_words_ids is None
                 and gc.forced_eos_token_id is None and gc.forced_bos_token_id is None and gc.suppress_tokens is None
                 and gc.begin_suppress_tokens is None and gc.sequence_bias is None)
        return plain

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ):
        """Caption (no prompt) or answer (prompt in input_ids, left-padded) images.

        The image goes through encoder and adapter once; each step reuses the memory, and the
        cross-attention keys/values are cached after the first step (prefix fusion: the image tokens
        enter the KV cache on the first step; without a cache they go in front again at every step).
        Returns prompt + new tokens, as transformers' generate does for decoder-only models.
        """
        memory_mask = kwargs.pop("memory_mask", None)
        image_slots = kwargs.pop("image_slots", None)
        if encoder_hidden_states is None:
            if pixel_values is None:
                raise ValueError("generate() needs pixel_values or encoder_hidden_states")
            encoder_hidden_states, memory_mask = self.memory_from_pixels(pixel_values, image_slots)  # (B, Kmem, Dt)
        b = encoder_hidden_states.shape[0]
        if input_ids is None:
            bos = kwargs.get("bos_token_id", self.generation_config.bos_token_id)
            if bos is None:
                bos = self.config.text_config.bos_token_id
            input_ids = torch.full((b, 1), bos, dtype=torch.long, device=encoder_hidden_states.device)
        elif input_ids.shape[0] != b:
            if b != 1:
                raise ValueError(f"{b} images for {input_ids.shape[0]} prompts: give one image per prompt, or one "
                                 "image for all of them")
            encoder_hidden_states = encoder_hidden_states.expand(input_ids.shape[0], -1, -1).contiguous()
            if memory_mask is not None:
                memory_mask = memory_mask.expand(input_ids.shape[0], -1).contiguous()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inline = (self.uses_prefix and self.config.image_token_id is not None
                  and bool((input_ids == self.config.image_token_id).any()))
        self._fit_positions(attention_mask, 0 if inline else encoder_hidden_states.shape[1], kwargs)
        if memory_mask is None and not inline and kwargs.get("cache") is None and self._can_use_fast_path(kwargs):
            from mmgpt.speed.decode import greedy_generate, loop_options

            return greedy_generate(self, encoder_hidden_states, input_ids, attention_mask,
                                   **loop_options(kwargs, self.generation_config))
        if memory_mask is not None:
            kwargs["memory_mask"] = memory_mask
        if inline:
            kwargs["inline_images"] = True
        kwargs.pop("fast", None)
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states, **kwargs
        )
