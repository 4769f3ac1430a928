"""MMGPTModel: ViT encoder -> adapter -> decoder; ITC + LM in one forward.

Fusion `cross_attention`: a GPT-2 decoder whose blocks cross-attend to the adapter output (mmgpt.cross_attention,
`run_decoder`). Fusion `prefix`: the adapter output goes in front of the token embeddings of any causal LM
(mmgpt.prefix). The losses are in mmgpt.losses, `generate` in mmgpt.generation.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from encoders import build_encoder
from mmgpt import prefix
from mmgpt.adapter import build_adapter
from mmgpt.config import MMGPTConfig
from mmgpt.cross_attention import CrossAttentionDecoderMixin, fuse_tanh_gelu
from mmgpt.generation import MMGPTGenerationMixin
from mmgpt.losses import bag_of_words_loss, contrastive_loss, next_token_loss, scale_grad, target_rows_loss
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


@dataclass
class _Memory:
    """What the decoder reads of the images in one forward (`MMGPTModel._read_images`)."""

    memory: torch.Tensor | None  # (B_img, K, Dt) one per image with `slots`, else (B, Kmem, Dt); None: inline
    mask: torch.Tensor | None  # (B, Kmem) 1 = an image token, 0 = padding of a row with fewer images
    slots: torch.Tensor | None  # (B, M) cross-attention: the images of each row (-1 = none)
    inputs_embeds: torch.Tensor | None  # (B, T, D) prefix fusion: the image tokens at the text's placeholders
    features: ImageFeatures | None  # the encoder + adapter output; None when the memory came precomputed


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


class MMGPTModel(MMGPTPreTrainedModel, CrossAttentionDecoderMixin, MMGPTGenerationMixin):
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
            fuse_tanh_gelu(decoder)
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
        """(B, E) L2-normed; in eval mode without gradients through the fused ViT forward (`mmgpt.speed.vit`)."""
        return self.image_embedding(vit.infer(self.vision, pixel_values).pooled)

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
        if return_logits is None:
            return_logits = not (self.training and labels is not None)
        mem = self._read_images(pixel_values, vision_outputs, encoder_hidden_states, input_ids, image_index,
                                image_slots, memory_mask, inline_images)
        logits, lm_loss, tapped, cache = self._decode(input_ids, attention_mask, mem, labels, position_ids, cache,
                                                      use_cache, return_logits, compute_itc)
        if labels is not None and logits is not None:
            lm_loss = next_token_loss(logits, labels, cfg.label_smoothing)
        logit_scale = self.logit_scale.exp().clamp(max=cfg.logit_scale_max)
        pooled = mem.features.pooled if mem.features is not None else None
        itc_loss = image_embeds = text_embeds = bow_loss = None
        if compute_itc:
            itc_loss, image_embeds, text_embeds = self._itc(
                input_ids, attention_mask, pooled, tapped, mem.inputs_embeds, image_index, itc_mask, itc_groups,
                itc_images, itc_negative_ids, itc_negative_mask, itc_negative_owner, logit_scale)
        if self.bow_head is not None and labels is not None and cfg.bow_weight > 0 and pooled is not None:
            bow_loss = bag_of_words_loss(self.bow_head, mem.features.tokens, labels, image_index, itc_mask)
        loss = None
        for part, w in ((lm_loss, cfg.lm_weight), (itc_loss, cfg.itc_weight), (bow_loss, cfg.bow_weight)):
            if part is not None:
                loss = w * part if loss is None else loss + w * part
        return MMGPTOutput(loss=loss, lm_loss=lm_loss, itc_loss=itc_loss, bow_loss=bow_loss, logits=logits,
                           image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=logit_scale,
                           cache=cache if use_cache else None)

    def _read_images(self, pixel_values, vision_outputs, encoder_hidden_states, input_ids, image_index, image_slots,
                     memory_mask, inline_images: bool) -> _Memory:
        """Encode the images (unless the memory comes precomputed) and lay out what the decoder reads of them:
        cross-attention keeps one memory per image and the decoder picks each row's (`slots`); prefix fusion
        gives each row its own, or puts it where the text's image placeholders stand (`inputs_embeds`)."""
        feats = memory_slots = None
        if encoder_hidden_states is None and (pixel_values is not None or vision_outputs is not None):
            feats = self.encode_image(pixel_values, vision_outputs)  # tokens (B_img, K, Dt)
            memory = feats.tokens
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
        return _Memory(memory, memory_mask, memory_slots, inputs_embeds, feats)

    def _decode(self, input_ids, attention_mask, mem: _Memory, labels, position_ids, cache, use_cache, return_logits,
                compute_itc) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, Cache | None]:
        """The decoder pass -> (logits (B, T, V), or None when the LM head ran on target rows only; that
        LM loss, else None; the unimodal layers' output (B, T, Dt) for ITC in the CoCa split, else None; cache)."""
        head, smoothing = self.decoder.get_output_embeddings(), self.config.label_smoothing
        if self.uses_prefix and not return_logits and labels is not None and not use_cache and cache is None \
                and prefix.plain_head(self):
            # Training: the base model's hidden states, the LM head on target rows only (as below).
            hidden = prefix.decoder_hidden(self, input_ids, attention_mask, mem.memory, position_ids,
                                           inputs_embeds=mem.inputs_embeds)  # (B, T, D)
            return None, target_rows_loss(hidden, labels, head, smoothing), None, cache
        if self.uses_prefix:
            logits, cache = prefix.decoder_logits(
                self, input_ids, attention_mask, mem.memory, position_ids, cache, bool(use_cache), mem.inputs_embeds
            )  # (B, T, V): the text positions only, so labels align with input_ids as in cross-attention
            return logits, None, None, cache
        tap = self.k if (compute_itc and self.k > 0) else None
        hidden, tapped, cache = self._decoder_hidden(  # short and long rows padded apart where it pays
            input_ids, attention_mask, mem.memory, position_ids, cache, bool(use_cache), tap, mem.slots, mem.mask,
            may_bucket=not return_logits and labels is not None)
        if return_logits or labels is None:
            return self.decoder.lm_head(hidden), None, tapped, cache  # (B, T, V)
        return None, target_rows_loss(hidden, labels, head, smoothing), tapped, cache

    def _itc(self, input_ids, attention_mask, pooled, tapped, inputs_embeds, image_index, itc_mask, itc_groups,
             itc_images, itc_negative_ids, itc_negative_mask, itc_negative_owner, logit_scale):
        """Contrastive loss over the ITC rows -> (loss, image_embeds (b, E), text_embeds (b, E)); the text
        embedding from the unimodal layers' output `tapped` (CoCa split), else from an image-free pass."""
        cfg = self.config
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
        text_embeds = self._text_embedding(scale_grad(text_hidden, cfg.itc_text_grad_scale), am)  # (b, E)
        groups = itc_groups[rows] if itc_groups is not None else None
        images = itc_images[rows] if itc_images is not None else None
        neg_embeds = None
        if itc_negative_ids is not None and itc_negative_ids.shape[0] > 0:
            neg_hidden = self._image_free_hidden(itc_negative_ids, itc_negative_mask)  # (N, Tn, Dt)
            neg_embeds = self._text_embedding(scale_grad(neg_hidden, cfg.itc_text_grad_scale),
                                              itc_negative_mask)  # (N, E)
        loss = contrastive_loss(image_embeds, text_embeds, logit_scale, groups,
                                negatives=neg_embeds, negative_owner=itc_negative_owner, images=images)
        return loss, image_embeds, text_embeds
