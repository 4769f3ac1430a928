"""MMGPTModel: ViT encoder -> adapter -> decoder; ITC + LM in one forward.

Fusion `cross_attention`: a GPT-2 decoder whose blocks cross-attend to the adapter output (run here, in
`run_decoder`). Fusion `prefix`: the adapter output goes in front of the token embeddings of any causal LM
(mmgpt.prefix).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, GPT2LMHeadModel, PreTrainedModel
from transformers.activations import NewGELUActivation
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.utils import ModelOutput

from encoders import build_encoder
from mmgpt import prefix
from mmgpt.adapter import build_adapter
from mmgpt.config import MMGPTConfig
from mmgpt.losses import contrastive_loss, linear_cross_entropy
from mmgpt.speed import vit


@dataclass
class MMGPTOutput(ModelOutput):
    """Every field is always present (None when not computed): the type never changes with flags."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    itc_loss: torch.Tensor | None = None
    bow_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    image_embeds: torch.Tensor | None = None  # (B_img, E), L2-normed
    text_embeds: torch.Tensor | None = None  # (B_itc, E), L2-normed
    logit_scale: torch.Tensor | None = None
    cache: Cache | None = None


@dataclass
class ImageFeatures:
    tokens: torch.Tensor  # (B, K, Dt) adapter output: the cross-attention memory, or the prefix tokens
    pooled: torch.Tensor  # (B, Dv) encoder's pooled vector


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass; its gradient times `scale` in the backward pass."""
    if scale == 1.0 or not x.requires_grad:
        return x
    d = x.detach()
    # (x - d) is exactly 0, so the forward is x bit for bit (nan_to_num: inf - inf would be NaN)
    return d + (x - d).nan_to_num(0.0) * scale


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


def _fuse_tanh_gelu(decoder) -> None:
    """GPT-2's `gelu_new` writes the tanh GELU out in 8 elementwise ops (and as many in backward); torch's
    one kernel computes the same formula. Parameter-free, so weights and saved configs are untouched."""
    for block in decoder.transformer.h:
        if isinstance(block.mlp.act, NewGELUActivation):
            block.mlp.act = nn.GELU(approximate="tanh")


_SAVE_TAKES_FORMAT = "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters


class MMGPTPreTrainedModel(PreTrainedModel):
    config_class = MMGPTConfig
    base_model_prefix = "mmgpt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The loss (LM + contrastive) is a mean per micro-batch: transformers' Trainer must scale it for
    # gradient accumulation itself (with **kwargs in forward it assumed num_items_in_batch was used).
    accepts_loss_kwargs = False
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["GPT2Block", "ViTLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As PreTrainedModel's, with the weights under the names the modules use
        (`save_original_format=False`): transformers' Trainer resumes a checkpoint with a plain
        `load_state_dict`, which skips the renaming of ViT's older key names, so the encoder kept
        fresh weights on resume. `from_pretrained` reads both layouts."""
        if _SAVE_TAKES_FORMAT:
            kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        # Parts come initialised by their own classes (ViT, GPT-2); only our own layers need this.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MMGPTModel(MMGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"decoder.lm_head.weight": "decoder.transformer.wte.weight"}

    def __init__(self, config: MMGPTConfig, vision=None, decoder: PreTrainedModel | None = None):
        super().__init__(config)
        attn = getattr(config, "_attn_implementation", None) or "sdpa"
        if attn not in ("sdpa", "eager"):
            attn = "sdpa"
        self.vision = vision or build_encoder(
            config.vision["backend"], config=config.vision.get("config") or {}, attn_implementation=attn,
            stem=config.vision.get("stem", "patch"), stem_width=config.vision.get("stem_width", 32),
            stem_extra=config.vision.get("stem_extra", 0), stem_norm=config.vision.get("stem_norm", False),
            stem_init=config.vision.get("stem_init", "torch"),
            position_init=config.vision.get("position_init", "learned"),
            position_scale=config.vision.get("position_scale", 0.02), pool=config.vision.get("pool"),
        )
        self.uses_prefix = config.fusion == "prefix"
        if decoder is None:
            if self.uses_prefix:
                decoder = AutoModelForCausalLM.from_config(config.text_config, attn_implementation=attn)
            else:
                decoder = GPT2LMHeadModel._from_config(config.text_config, attn_implementation=attn)
        self.decoder = decoder
        tcfg = decoder.config
        self.k = config.unimodal_layers
        if self.uses_prefix:
            # No `decoder.transformer` here: post_init collects the decoder's own tied weights instead.
            self._tied_weights_keys = None
        # Unimodal layers never see the image: they own no cross-attention weights (DDP needs every
        # parameter to get a gradient).
        for block in decoder.transformer.h[: self.k] if self.k else ():
            for name in ("crossattention", "ln_cross_attn"):
                if hasattr(block, name):
                    delattr(block, name)
        if not self.uses_prefix:
            _fuse_tanh_gelu(decoder)
        dv, dt = self.vision.hidden_size, tcfg.hidden_size
        self.adapter = build_adapter(config.adapter, dv, dt)
        e = config.projection_dim
        self.image_proj = nn.Linear(dv, e, bias=False)
        self.text_proj = nn.Linear(dt, e, bias=False)
        # The CoCa split reads the text embedding mid-decoder, before ln_f: give it its own norm.
        self.text_norm = nn.LayerNorm(dt) if self.k > 0 else None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        # cross-attention: one learned code per image slot of a conversation, added to that image's tokens
        self.image_code = (nn.Parameter(torch.randn(config.max_images, dt) * 0.02)
                           if config.max_images > 1 and not self.uses_prefix else None)
        # bag-of-words head (training aid): mean image token -> which vocabulary tokens the caption holds
        self.bow_head = nn.Linear(dt, tcfg.vocab_size) if config.bow_weight > 0 else None
        self.post_init()
        if self.bow_head is not None:  # start every token at a small prior, not at p = 0.5
            nn.init.constant_(self.bow_head.bias, -math.log(tcfg.vocab_size))

    # --- parts -----------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()

    # --- image side ------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor | None = None, vision_outputs=None,
                     fast: bool = False) -> ImageFeatures:
        """Encoder (skipped when `vision_outputs`, e.g. cached features of a frozen encoder, are given)
        -> adapter. `fast`: the encoder's inference forward where it has one (eval, no gradients)."""
        if vision_outputs is not None:
            out = vision_outputs
        else:
            out = vit.infer(self.vision, pixel_values) if fast else self.vision(pixel_values)
        # out.patch_tokens (B, N, Dv), out.pooled (B, Dv)
        return ImageFeatures(tokens=self.adapter(out.patch_tokens), pooled=out.pooled)

    def image_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled), dim=-1)  # (B, E)

    def compose_memory(self, tokens: torch.Tensor, slots: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What each text row reads of the images: tokens (B_img, K, Dt) of the adapter, slots (B, M) the
        images of each row in order (-1 = none; a row's images come first). None: image b for row b.

        -> memory (B, M*K, Dt), each image's tokens plus its slot's code (cross-attention), and a mask
        (B, M*K) of real image tokens, or None when every row has all M images."""
        full = slots is None  # one image per row: no padding to look for (no data-dependent branch to export)
        if slots is None:
            slots = torch.arange(tokens.shape[0], device=tokens.device)[:, None]  # (B, 1)
        b, m = slots.shape
        k, d = tokens.shape[1:]
        if m > self.config.max_images and not self.uses_prefix:
            raise ValueError(f"{m} images in one conversation, and this model reads at most "
                             f"{self.config.max_images} (config.max_images)")
        mem = tokens.index_select(0, slots.clamp(min=0).reshape(-1)).view(b, m, k, d)  # (B, M, K, Dt)
        if self.image_code is not None:
            mem = mem + self.image_code[:m].view(1, m, 1, d).to(mem.dtype)
        valid = slots >= 0  # (B, M)
        mask = None if full or bool(valid.all()) else valid.repeat_interleave(k, dim=1)  # (B, M*K)
        return mem.reshape(b, m * k, d), mask

    def memory_from_pixels(self, pixel_values: torch.Tensor, slots: torch.Tensor | None = None, fast: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images -> (memory (B, M*K, Dt), mask or None): what `generate` reads (see `compose_memory`)."""
        return self.compose_memory(self.encode_image(pixel_values, fast=fast).tokens, slots)

    # --- text side -------------------------------------------------------------------------------

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

    def _text_embedding(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Hidden state at the last real token (EOS) -> projection -> L2 norm."""
        if attention_mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        else:
            last = attention_mask.long().sum(-1) - 1  # right padding: index of EOS, (B,)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, Dt)
        if self.text_norm is not None:
            h = self.text_norm(h)
        return F.normalize(self.text_proj(h), dim=-1)  # (B, E)

    def _target_rows_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy with only the rows that have a target through the LM head, fused
        with the loss (`mmgpt.losses.linear_cross_entropy`): hidden (B, T, D), labels (B, T)."""
        keep = labels[:, 1:] != -100  # (B, T-1)
        rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]  # (N, D), (N,)
        head = self.decoder.get_output_embeddings()
        if type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(rows, head.weight, targets, self.config.label_smoothing)
        return F.cross_entropy(head(rows).float(), targets, label_smoothing=self.config.label_smoothing)  # e.g. LoRA

    def _image_free_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, Dt) hidden states of a decoder pass without the image: the first k layers in the CoCa
        split, else all (prefix fusion: the decoder's base model with no image tokens in front)."""
        if self.uses_prefix:
            return prefix.text_hidden(self, input_ids, attention_mask)
        hidden, _, _ = self.run_decoder(input_ids, attention_mask, stop_after=self.k or None)
        return hidden

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image-free text embedding (the one ITC uses)."""
        return self._text_embedding(self._image_free_hidden(input_ids, attention_mask), attention_mask)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_embedding(self.vision(pixel_values).pooled)

    # --- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        itc_mask: torch.Tensor | None = None,
        itc_groups: torch.Tensor | None = None,
        itc_images: torch.Tensor | None = None,
        itc_negative_ids: torch.Tensor | None = None,
        itc_negative_mask: torch.Tensor | None = None,
        itc_negative_owner: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        vision_outputs=None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        compute_itc: bool | None = None,
        return_logits: bool | None = None,
        image_slots: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        inline_images: bool = False,
        **kwargs,
    ) -> MMGPTOutput:
        """
        input_ids, attention_mask: (B, T) right-padded (left padding is fine for generation).
        pixel_values: (B_img, 3, H, W); image_index: (B,) row of pixel_values for each text row
            (several texts may share an image; default: one image per row).
        labels: (B, T) next-token targets aligned with input_ids (-100 = ignore); shifted here.
        itc_mask: (B,) bool, rows whose text is a caption of its image (ITC pairs); default: all rows
            when ITC is on. itc_groups: (B,) ids; equal ids mark identical captions (all positives).
            itc_images: (B,) ids of each row's image, when an image brings several ITC texts (its
            caption and question+answer texts): a text is then a positive of every image it is true of.
        itc_negative_ids, itc_negative_mask: (N, Tn) hard-negative texts (a caption with one detail
            changed), tokenized like captions; itc_negative_owner: (N,) which ITC pair each contradicts
            (0 = the first row of itc_mask). They are extra wrong answers in that image's
            image-to-text softmax (`mmgpt.losses.contrastive_loss`).
        encoder_hidden_states: (B, Kmem, Dt) precomputed memory (`compose_memory`; generation passes it), with
            `memory_mask` (B, Kmem) when rows hold different numbers of images; with prefix fusion these are
            the image tokens put in front of the text (logits stay (B, T, V), text only), or with
            `inline_images` put where the text's image placeholders (`config.image_token_id`) stand.
        image_slots: (B, M) the images of each row, in order (a conversation's; -1 = none, a row's images
            first), indices into pixel_values. Cross-attention reads them all, each with its slot's code;
            prefix fusion puts each image's K tokens at the row's K placeholder tokens, in order.
        position_ids: (B, T) text positions (prefix fusion shifts them by K); default: from attention_mask.
        vision_outputs: precomputed `EncoderOutput` (patch_tokens, pooled) of a frozen encoder, used in
            place of pixel_values (the feature cache).
        return_logits: default True, except in training mode with labels: then the LM head runs only at
            positions that have a target (prompt, padding and the last position skip it), fused with the
            loss (`mmgpt.losses.linear_cross_entropy`), and `logits` is None; pass True to get them
            anyway. (Prefix fusion does this for decoder types whose logits are the LM head on the base
            model's output, `mmgpt.prefix.PLAIN_HEAD_TYPES`; others keep full logits.)
        """
        kwargs.pop("past_key_values", None) if cache is not None else None
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        cfg = self.config
        if compute_itc is None:
            has_image = pixel_values is not None or vision_outputs is not None
            compute_itc = labels is not None and cfg.itc_weight > 0 and has_image
        pooled = None
        memory_slots = None  # cross-attention: memory stays one per image, the decoder picks each row's
        if encoder_hidden_states is None and (pixel_values is not None or vision_outputs is not None):
            feats = self.encode_image(pixel_values, vision_outputs)  # tokens (B_img, K, Dt)
            memory, pooled = feats.tokens, feats.pooled
            if self.uses_prefix and image_slots is not None:
                memory, memory_mask = self.compose_memory(memory, image_slots)  # (B, M*K, Dt)
                inline_images = True
            elif self.uses_prefix and image_index is not None:
                memory = memory[image_index]  # (B, K, Dt)
            elif not self.uses_prefix:
                memory_slots = image_slots if image_slots is not None else (
                    image_index[:, None] if image_index is not None else None)  # (B, M)
                if memory_slots is None and self.image_code is not None:
                    memory_slots = torch.arange(memory.shape[0], device=memory.device)[:, None]
        else:
            memory = encoder_hidden_states
        inputs_embeds = None
        if self.uses_prefix and inline_images:
            # the image tokens go where the placeholders stand (later generation steps have none: text only)
            inputs_embeds = prefix.inline_embeds(self, input_ids, memory, memory_mask)  # (B, T, D)
            memory = None

        tapped = None
        lm_loss = itc_loss = bow_loss = image_embeds = text_embeds = None
        if return_logits is None:
            return_logits = not (self.training and labels is not None)
        if self.uses_prefix and not return_logits and labels is not None and not use_cache and cache is None \
                and prefix.plain_head(self):
            # Training: the base model's hidden states, the LM head on target rows only (as below).
            hidden = prefix.decoder_hidden(self, input_ids, attention_mask, memory, position_ids,
                                           inputs_embeds=inputs_embeds)  # (B, T, D)
            logits, lm_loss = None, self._target_rows_loss(hidden, labels)
        elif self.uses_prefix:
            logits, cache = prefix.decoder_logits(
                self, input_ids, attention_mask, memory, position_ids, cache, bool(use_cache), inputs_embeds
            )  # (B, T, V): the text positions only, so labels align with input_ids as in cross-attention
        else:
            tap = self.k if (compute_itc and self.k > 0) else None
            buckets = None
            if not return_logits and labels is not None and tap is None and not use_cache and cache is None \
                    and position_ids is None:
                buckets = _length_buckets(attention_mask, memory_slots)
            if buckets is not None:  # short and long rows (records beside conversations) padded apart
                hidden = self._bucketed_decoder(buckets, input_ids, attention_mask, memory, memory_slots, memory_mask)
            else:
                hidden, tapped, cache = self.run_decoder(
                    input_ids, attention_mask, memory, position_ids, cache, bool(use_cache), tap_layer=tap,
                    memory_slots=memory_slots, memory_mask=memory_mask,
                )
            logits = None
            if return_logits or labels is None:
                logits = self.decoder.lm_head(hidden)  # (B, T, V)
            else:
                lm_loss = self._target_rows_loss(hidden, labels)

        if labels is not None and logits is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
            shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
            lm_loss = F.cross_entropy(
                shift_logits.float(), shift_labels, ignore_index=-100, label_smoothing=cfg.label_smoothing
            )
        logit_scale = self.logit_scale.exp().clamp(max=cfg.logit_scale_max)
        if compute_itc:
            rows = (
                torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                if itc_mask is None
                else itc_mask.bool()
            )
            img_rows = image_index[rows] if image_index is not None else rows.nonzero().squeeze(1)
            image_embeds = self.image_embedding(pooled[img_rows])  # (b, E)
            am = attention_mask[rows] if attention_mask is not None else None
            if self.k > 0:
                text_hidden = tapped[rows]  # (b, T, Dt): the unimodal layers' output, same pass
            elif bool(rows.any()):
                ids_r = input_ids[rows]
                if inputs_embeds is not None:  # inline images: the caption's text alone
                    ids_r, am = prefix.drop_placeholders(self, ids_r, am)
                text_hidden = self._image_free_hidden(ids_r, am)  # (b, T, Dt), image-free pass
            else:  # no caption row in this batch (e.g. all questions): an empty pass kept in the graph
                text_hidden = self._image_free_hidden(input_ids[:1], attention_mask[:1] if am is not None else None)[:0]
            text_embeds = self._text_embedding(_scale_grad(text_hidden, cfg.itc_text_grad_scale), am)  # (b, E)
            groups = itc_groups[rows] if itc_groups is not None else None
            images = itc_images[rows] if itc_images is not None else None
            neg_embeds = None
            if itc_negative_ids is not None and itc_negative_ids.shape[0] > 0:
                neg_hidden = self._image_free_hidden(itc_negative_ids, itc_negative_mask)  # (N, Tn, Dt)
                neg_embeds = self._text_embedding(_scale_grad(neg_hidden, cfg.itc_text_grad_scale),
                                                  itc_negative_mask)  # (N, E)
            itc_loss = contrastive_loss(image_embeds, text_embeds, logit_scale, groups,
                                        negatives=neg_embeds, negative_owner=itc_negative_owner, images=images)

        if self.bow_head is not None and labels is not None and cfg.bow_weight > 0 and pooled is not None:
            bow_loss = self._bow_loss(feats.tokens, labels, image_index, itc_mask)

        loss = None
        for part, w in ((lm_loss, cfg.lm_weight), (itc_loss, cfg.itc_weight), (bow_loss, cfg.bow_weight)):
            if part is not None:
                loss = w * part if loss is None else loss + w * part
        return MMGPTOutput(
            loss=loss,
            lm_loss=lm_loss,
            itc_loss=itc_loss,
            bow_loss=bow_loss,
            logits=logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            cache=cache if use_cache else None,
        )

    def _bow_loss(self, tokens, labels, image_index, itc_mask):
        """Bag of words: for every vocabulary entry, a binary cross-entropy on whether the image's ITC rows
        (`itc_mask`: its caption, plus answers with itc_questions; all rows when None) hold that target
        token, from bow_head(mean image token);
        summed over the vocabulary, averaged over the rows. Each token is its own yes/no task, so a
        word that tells images apart (a shape name) is not crowded out by the frequent ones."""
        rows = itc_mask.bool() if itc_mask is not None else torch.ones(labels.shape[0], dtype=torch.bool,
                                                                         device=labels.device)
        img = image_index[rows] if image_index is not None else rows.nonzero().squeeze(1)  # (b,)
        lab = labels[rows]  # (b, T)
        if lab.shape[0] == 0:
            return None
        bag = torch.zeros(lab.shape[0], self.bow_head.out_features, device=lab.device)
        keep = lab != -100
        bag[torch.arange(lab.shape[0], device=lab.device)[:, None].expand_as(lab)[keep], lab[keep]] = 1.0
        logits = self.bow_head(tokens.mean(1)[img]).float()  # (b, V)
        return F.binary_cross_entropy_with_logits(logits, bag, reduction="sum") / lab.shape[0]

    # --- generation ------------------------------------------------------------------------------

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
        tr = self.decoder.transformer  # LoRA on the blocks is folded in (fastgen._wb); on these it is not
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
            from mmgpt.speed.decode import greedy_generate, sampling_warpers

            gc = self.generation_config
            eos = kwargs.get("eos_token_id", gc.eos_token_id)
            pad = kwargs.get("pad_token_id", gc.pad_token_id)
            return greedy_generate(
                self, encoder_hidden_states, input_ids, attention_mask, int(kwargs["max_new_tokens"]),
                eos_token_id=eos, pad_token_id=eos if pad is None else pad,
                min_new_tokens=int(kwargs.get("min_new_tokens") or 0),
                warpers=sampling_warpers(kwargs, gc) if kwargs.get("do_sample", gc.do_sample) else None,
            )
        if memory_mask is not None:
            kwargs["memory_mask"] = memory_mask
        if inline:
            kwargs["inline_images"] = True
        kwargs.pop("fast", None)
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states, **kwargs
        )
