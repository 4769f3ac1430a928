"""Prefix fusion: the adapter output is prepended to the token embeddings of any causal LM.

LLaVA-style (Liu et al. 2023, "Visual Instruction Tuning"): the image becomes K soft tokens in front of
the text, `[image tokens][BOS prompt target EOS][pad]`, so the decoder needs no weights of its own for the
image and any `AutoModelForCausalLM` (GPT-2, Llama, Qwen2, ...) can serve. The functions here are called
from `MMGPTModel` when `config.fusion == "prefix"`; generation reuses `GenerationMixin` through
`MMGPTModel.forward`, which puts the image tokens into the KV cache on the first step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def num_image_tokens(model) -> int:
    """K: how many tokens the adapter puts in front of the text (resampler queries, else encoder tokens)."""
    queries = getattr(model.adapter, "queries", None)
    return int(queries.shape[0]) if queries is not None else int(model.vision.num_tokens)


def decoder_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_tokens: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    cache: Cache | None = None,
    use_cache: bool = False,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Cache | None]:
    """Logits at the text positions only, (B, T, V), and the cache.

    input_ids, attention_mask: (B, T_new) text and (B, T_text) its mask over past + new text tokens (right
    padding for training, left padding for generation). image_tokens: (B, K, D) adapter output, or None for
    a text-only pass. With an empty cache the image tokens go in front of the text; once they are in the
    cache (generation, later steps) only the new text goes in, and the mask still gets K ones in front.
    position_ids: text positions (0 = first real token), shifted by K here; by default they come from the
    full mask, so `[img][pad][prompt]` places the prompt exactly where `[img][prompt]` does.
    """
    x, mask, position_ids, t = _inputs(model, input_ids, attention_mask, image_tokens, position_ids, cache,
                                       inputs_embeds)
    out = model.decoder(
        inputs_embeds=x,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        logits_to_keep=t,  # the text positions: the last T of the sequence
    )
    return out.logits, (out.cache if use_cache else None)  # (B, T, V)


# Decoder types whose CausalLM forward is exactly `lm_head(base_model(...).last_hidden_state)`: no
# soft-capping (Gemma 2), logit scale (Cohere) or logits scaling (Granite). Others keep full logits.
PLAIN_HEAD_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"}


def plain_head(model) -> bool:
    """True when the decoder's logits are just `base_model(...)` through its LM head (SmolLM2 is Llama)."""
    return model.decoder.config.model_type in PLAIN_HEAD_TYPES


def decoder_hidden(model, input_ids, attention_mask, image_tokens, position_ids=None, inputs_embeds=None
                   ) -> torch.Tensor:
    """The decoder's base model over `[image tokens][text]` without the LM head: (B, T, D) hidden states
    at the text positions (after the final norm), for a loss that runs the head on target rows only."""
    x, mask, position_ids, t = _inputs(model, input_ids, attention_mask, image_tokens, position_ids, None,
                                       inputs_embeds)
    out = model.decoder.base_model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state[:, -t:]


def _inputs(model, input_ids, attention_mask, image_tokens, position_ids, cache, inputs_embeds=None):
    """Embeddings with the image tokens in front (empty cache), the mask with K ones in front, and the
    position ids: (x (B, q, D), mask (B, K + T_text), position_ids (B, q), T)."""
    decoder = model.decoder
    b, t = input_ids.shape
    x = decoder.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
    past = cache.get_seq_length() if cache is not None else 0
    k = image_tokens.shape[1] if image_tokens is not None else 0
    prepend = image_tokens is not None and past == 0
    if attention_mask is None:
        text_past = past - k if (image_tokens is not None and past > 0) else past
        attention_mask = torch.ones(b, text_past + t, dtype=torch.long, device=x.device)  # (B, T_text)
    mask = attention_mask.long()
    if image_tokens is not None:
        mask = torch.cat([mask.new_ones(b, k), mask], dim=1)  # (B, K + T_text)
    if prepend:
        x = torch.cat([image_tokens.to(x.dtype), x], dim=1)  # (B, K + T, D)
    q = x.shape[1]
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -q:]  # (B, q)
    else:
        position_ids = position_ids.expand(b, -1) + k  # (B, T): text positions after the K image positions
        if prepend:
            img_pos = torch.arange(k, device=x.device).expand(b, k)  # (B, K)
            position_ids = torch.cat([img_pos, position_ids], dim=1)  # (B, K + T)
    return x, mask, position_ids, t


def text_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Image-free pass of the decoder's base model (no LM head): (B, T, D), after its final norm."""
    return model.decoder.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state


def inline_embeds(model, input_ids: torch.Tensor, memory: torch.Tensor | None,
                  memory_mask: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings (B, T, D) with the image tokens where the placeholders stand (LLaVA's interleaving):
    row b's placeholders take its images' tokens in order, `memory[b][memory_mask[b]]` (B, M*K, D) from
    `compose_memory`. A sequence without placeholders (a later generation step) is text only."""
    emb = model.decoder.get_input_embeddings()
    ph_id = model.config.image_token_id
    if ph_id is None:
        raise ValueError("this prefix model has no image placeholder token (config.image_token_id): it reads one "
                         "image in front of the text; conversations with images need a model built with one")
    ph = input_ids == ph_id  # (B, T)
    x = emb(input_ids)  # (B, T, D)
    n_ph = int(ph.sum())
    if memory is None or n_ph == 0:
        if n_ph:
            raise ValueError(f"the text holds {n_ph} image placeholder tokens and no images were given")
        return x
    tokens = memory[memory_mask.bool()] if memory_mask is not None else memory.reshape(-1, memory.shape[-1])
    if tokens.shape[0] != n_ph:  # (N, D): every row's image tokens, row by row
        raise ValueError(f"the text holds {n_ph} image placeholder tokens for {tokens.shape[0]} image tokens: "
                         "each image needs exactly one <image> placeholder in its user turn")
    return x.masked_scatter(ph.unsqueeze(-1), tokens.to(x.dtype))


def drop_placeholders(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The text of rows with inline image placeholders, without them (right padding): for the image-free
    pass of the contrastive loss. -> (input_ids, attention_mask), both (B, T)."""
    keep = input_ids != model.config.image_token_id  # (B, T)
    if attention_mask is not None:
        keep &= attention_mask.bool()
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept tokens first, in order
    ids = torch.gather(input_ids, 1, order)
    mask = torch.gather(keep, 1, order).long()
    pad = model.config.text_config.pad_token_id
    ids = ids.masked_fill(mask == 0, pad if pad is not None else 0)
    return ids, mask
