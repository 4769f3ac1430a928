"""Fusion `cross_attention`: GPT-2's blocks run by hand, layers >= k cross-attending to the images.

`CrossAttentionDecoderMixin` gives `MMGPTModel` its decoder pass (`run_decoder`: a cache, a stop after the
unimodal layers, a tap of their output) and the training pass over buckets of rows padded apart. The blocks'
cross-attention keys and values are projected once per image and picked per row (`_block_with_shared_memory`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache


def _additive_memory_mask(memory_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """(B, Kmem) with 1 = an image token, 0 = padding of a row with fewer images -> (B, 1, 1, Kmem) additive."""
    if memory_mask is None:
        return None
    out = torch.zeros(memory_mask.shape, dtype=dtype, device=memory_mask.device)
    out.masked_fill_(~memory_mask.bool(), torch.finfo(dtype).min)
    return out[:, None, None, :]


def _block_with_shared_memory(block, h, mask, memory, slots, position_ids, code=None, kv=None) -> torch.Tensor:
    """GPT-2 block (self-attention, cross-attention, MLP) for rows that share images: row b attends to the
    images ``memory[slots[b, j]]`` (j = 0 .. M-1; -1 = no image in that slot), each plus its slot's code
    ``code[j]`` when given. The cross-attention keys and values are projected once per image and then
    picked per row, where the block itself would project the row's memory once per row (4x the work with
    a caption and 3 questions per image). The code enters the projection linearly, so its keys / values
    are added after the pick. Same math as ``block(h, ..., row_memory, memory_mask)``; training path only.
    ``kv``: the images' keys and values, projected already (one projection for several buckets of rows)."""
    residual = h
    attn, _ = block.attn(block.ln_1(h), cache=None, attention_mask=mask, use_cache=False, position_ids=position_ids)
    h = attn + residual
    ca = block.crossattention
    b, t, d = h.shape
    k = memory.shape[1]
    m = slots.shape[1]
    heads, hd = ca.num_heads, ca.head_dim
    q = ca.q_attn(block.ln_cross_attn(h)).view(b, t, heads, hd).transpose(1, 2)  # (B, H, T, hd)
    key, value = kv if kv is not None else ca.c_attn(memory).split(ca.split_size, dim=2)  # (B_img, K, D) each
    pick = slots.clamp(min=0).reshape(-1)  # (B*M,)
    # index_select, not key[pick]: its backward (index_add_) is ~5x faster on CPU than index_put_
    key = key.index_select(0, pick).view(b, m, k, d)  # (B, M, K, D)
    value = value.index_select(0, pick).view(b, m, k, d)
    if code is not None:  # (M, D) codes -> their keys / values (no bias: it is in the image's part already)
        ck, cv = (code[:m] @ ca.c_attn.weight).split(ca.split_size, dim=1)  # (M, D) each
        key, value = key + ck[None, :, None, :], value + cv[None, :, None, :]
    key = key.view(b, m * k, heads, hd).transpose(1, 2)  # (B, H, M*K, hd)
    value = value.view(b, m * k, heads, hd).transpose(1, 2)
    cross_mask = None
    if bool((slots < 0).any()):
        cross_mask = _additive_memory_mask((slots >= 0).repeat_interleave(k, dim=1), q.dtype)  # (B, 1, 1, M*K)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=cross_mask,
                                         dropout_p=ca.attn_dropout.p if ca.training else 0.0, scale=ca.scaling)
    out = ca.resid_dropout(ca.c_proj(out.transpose(1, 2).reshape(b, t, d)))
    h = h + out
    return h + block.mlp(block.ln_2(h))


def _length_buckets(attention_mask: torch.Tensor | None, slots: torch.Tensor | None = None, keep: float = 0.75):
    """Rows of a right-padded training batch in buckets, each padded only to its own longest row and its own
    number of images: rows by image count (a question about two images reads twice the memory of a caption),
    then each count's rows in two by length, shortest first (a caption and questions of ~16 tokens beside
    conversations of ~50). -> [(rows, width)], or None when one (B, T) pass runs at most 1/`keep` of the
    buckets' work."""
    if attention_mask is None or attention_mask.shape[0] < 2:
        return None
    b, t = attention_mask.shape
    if not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):  # not right padding
        return None
    lengths = attention_mask.sum(1)  # (B,)
    counts = (slots >= 0).sum(1) if slots is not None else torch.ones_like(lengths)  # (B,)
    m_max = int(counts.max())
    out, work = [], 0
    for m in sorted(set(counts.tolist())):
        idx = (counts == m).nonzero().squeeze(1)
        sorted_len, order = torch.sort(lengths[idx], stable=True)
        order = idx[order]
        n = order.shape[0]
        cut = n
        if n > 1:
            k = torch.arange(1, n, device=lengths.device)  # rows in the short bucket
            cost = k * sorted_len[:-1] + (n - k) * sorted_len[-1]
            best = int(torch.argmin(cost))
            if float(cost[best]) < n * float(sorted_len[-1]):
                cut = best + 1
        for rows, width in ((order[:cut], sorted_len[cut - 1]), (order[cut:], sorted_len[-1])):
            if rows.numel():
                out.append((rows, int(width)))
                work += rows.numel() * int(width) * (1 + m)  # tokens, and the memory they read
    if work > keep * b * t * (1 + m_max):
        return None
    return out


def fuse_tanh_gelu(decoder) -> None:
    """GPT-2's `gelu_new` writes the tanh GELU out in 8 elementwise ops (and as many in backward); torch's
    one kernel computes the same formula. Parameter-free, so weights and saved configs are untouched."""
    for block in decoder.transformer.h:
        if isinstance(block.mlp.act, NewGELUActivation):
            block.mlp.act = nn.GELU(approximate="tanh")


class CrossAttentionDecoderMixin:
    """The decoder side of `MMGPTModel` with cross-attention fusion (reads `self.decoder`, `self.k`,
    `self.image_code`, `self.compose_memory`)."""

    @staticmethod
    def _positions(attention_mask, past: int, q_len: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(past, past + q_len, device=device).unsqueeze(0)  # (1, T)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
        return pos[:, -q_len:]

    def _self_attn_mask(self, attention_mask, past: int, q_len: int, dtype, device):
        """None where SDPA's own causal path is exact; else an additive (B, 1, T, past + T) mask."""
        sdpa = self.decoder.config._attn_implementation == "sdpa"
        if attention_mask is None:
            if sdpa and (past == 0 or q_len == 1):
                return None
            attention_mask = torch.ones(1, past + q_len, device=device, dtype=torch.long)
        elif sdpa and past == 0 and q_len > 1:
            am = attention_mask.bool()
            # Right padding only: real tokens never look right, so the plain causal kernel is exact for them.
            if bool((am[:, 1:] <= am[:, :-1]).all()):
                return None
        elif sdpa and q_len == 1 and bool(attention_mask.bool().all()):
            return None
        k_len = attention_mask.shape[-1]
        q_pos = torch.arange(k_len - q_len, k_len, device=device).view(-1, 1)  # (T, 1)
        k_pos = torch.arange(k_len, device=device).view(1, -1)  # (1, K)
        allowed = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool()[:, None, :]  # (B, T, K)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)  # (B, 1, T, K)

    def run_decoder(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        stop_after: int | None = None,
        tap_layer: int | None = None,
        memory_slots: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Cache | None]:
        """Run GPT-2 blocks; layers >= k cross-attend to `memory` (B, Kmem, Dt) when given (`memory_mask`
        (B, Kmem): 1 = an image token, 0 = padding), or with `memory_slots` (B, M) to the images
        `memory[memory_slots[b]]` of a memory of (B_img, K, Dt), one per image (`compose_memory`).

        Returns (hidden after ln_f, or after `stop_after` layers without ln_f; the hidden state entering
        layer `tap_layer` if asked; the cache).
        """
        tr = self.decoder.transformer
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        if use_cache and memory is not None and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache(config=self.config.text_config))
        past = cache.get_seq_length() if cache is not None else 0
        q_len = input_ids.shape[1]
        if position_ids is None:
            position_ids = self._positions(attention_mask, past, q_len, input_ids.device)
        h = tr.wte(input_ids) + tr.wpe(position_ids)  # (B, T, Dt)
        h = tr.drop(h)
        mask = self._self_attn_mask(attention_mask, past, q_len, h.dtype, h.device)
        tapped = None
        n_layers = len(tr.h) if stop_after is None else stop_after
        shared = memory_slots is not None and memory is not None
        if shared and (use_cache or any(getattr(b, "gradient_checkpointing", False) for b in tr.h)):
            # the blocks' own path (cache / checkpointing): each row's memory made out
            memory, memory_mask = self.compose_memory(memory, memory_slots)
            shared = False
        cross_mask = _additive_memory_mask(memory_mask, h.dtype) if memory is not None else None
        for i, block in enumerate(tr.h[:n_layers]):
            if i == tap_layer:
                tapped = h
            if shared and i >= self.k:
                h = _block_with_shared_memory(block, h, mask, memory, memory_slots, position_ids, self.image_code)
                continue
            mem = memory if i >= self.k else None
            h = block(h, cache, mask, mem, encoder_attention_mask=cross_mask if mem is not None else None,
                      use_cache=use_cache, position_ids=position_ids)
        if tap_layer is not None and tap_layer == n_layers:
            tapped = h
        if stop_after is None:
            h = tr.ln_f(h)
        return h, tapped, cache

    def _bucketed_decoder(self, buckets, input_ids, attention_mask, memory, memory_slots, memory_mask):
        """The decoder over each bucket of rows cut to its own longest row and number of images (right
        padding, so every real token sees exactly what it sees in the whole batch); -> (B, T, Dt) hidden
        states after ln_f, zeros past each row's bucket width (padding: no targets there). Layer by layer,
        so the images' cross-attention keys and values are projected once for all buckets."""
        b, t = input_ids.shape
        if memory_slots is None:  # a memory per row (no slot codes): each bucket through run_decoder
            parts = []
            for rows, width in buckets:
                mmask = memory_mask[rows] if memory_mask is not None else None
                mem = memory[rows] if memory is not None else None
                parts.append(self.run_decoder(input_ids[rows, :width], attention_mask[rows, :width], mem,
                                              memory_mask=mmask)[0])
        else:
            tr = self.decoder.transformer
            hs, pos, masks, slots = [], [], [], []
            for rows, width in buckets:
                am = attention_mask[rows, :width]
                p = self._positions(am, 0, width, input_ids.device)  # (b_k, width)
                hs.append(tr.drop(tr.wte(input_ids[rows, :width]) + tr.wpe(p)))
                pos.append(p)
                masks.append(self._self_attn_mask(am, 0, width, hs[-1].dtype, hs[-1].device))
                sl = memory_slots[rows]
                slots.append(sl[:, : max(1, int((sl >= 0).sum(1).max()))])
            for i, block in enumerate(tr.h):
                if i < self.k:
                    hs = [block(h, None, m, None, use_cache=False, position_ids=p) for h, m, p in zip(hs, masks, pos)]
                    continue
                kv = block.crossattention.c_attn(memory).split(block.crossattention.split_size, dim=2)
                hs = [_block_with_shared_memory(block, h, m, memory, sl, p, self.image_code, kv=kv)
                      for h, m, sl, p in zip(hs, masks, slots, pos)]
            parts = [tr.ln_f(h) for h in hs]
        out = parts[0].new_zeros(b, t, parts[0].shape[-1])
        for (rows, width), h in zip(buckets, parts):
            out = out.index_put((rows[:, None], torch.arange(width, device=h.device)[None, :]), h)
        return out

    def _decoder_hidden(self, input_ids, attention_mask, memory, position_ids, cache, use_cache: bool,
                        tap_layer, memory_slots, memory_mask, may_bucket: bool):
        """`run_decoder`'s (hidden after ln_f, tapped, cache); with `may_bucket` (training, the LM head on
        target rows only) and no tap, cache or given positions, the pass over buckets of rows padded apart
        (records beside conversations) where `_length_buckets` finds it worth it."""
        buckets = None
        if may_bucket and tap_layer is None and not use_cache and cache is None and position_ids is None:
            buckets = _length_buckets(attention_mask, memory_slots)
        if buckets is not None:
            return self._bucketed_decoder(buckets, input_ids, attention_mask, memory, memory_slots, memory_mask), \
                None, cache
        return self.run_decoder(input_ids, attention_mask, memory, position_ids, cache, use_cache, tap_layer=tap_layer,
                                memory_slots=memory_slots, memory_mask=memory_mask)
