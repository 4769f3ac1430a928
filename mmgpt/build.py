"""Build a model and its processor from a preset, a config, or pretrained parts by name."""

from __future__ import annotations

from collections.abc import Iterable

from mmgpt.config import MMGPTConfig
from mmgpt.model import MMGPTModel
from mmgpt.prefix import num_image_tokens
from mmgpt.processor import IMAGE_TOKEN, MMGPTProcessor, train_bpe_tokenizer


def _mark_initialised(module) -> None:
    # Loaded weights must survive the composite model's post_init weight initialisation.
    for m in module.modules():
        m._is_hf_initialized = True


_VISION_OPTIONS = ("stem", "stem_width", "stem_extra", "stem_norm", "stem_init", "position_init", "position_scale",
                   "pool", "image_mean", "image_std")


def build_model(
    config: MMGPTConfig | str | dict,
    texts: Iterable[str] | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[MMGPTModel, MMGPTProcessor]:
    """-> (model, processor).

    `config`: a preset name (`tiny`, `base`, `tiny-prefix`, `smollm2-135m`, ...), a path to a preset JSON,
    a dict of config fields, or an MMGPTConfig. Parts named in `vision_pretrained` / `text_pretrained`
    (hub ids or local folders) load with `from_pretrained` (with prefix fusion the decoder is any
    `AutoModelForCausalLM`, with its `AutoTokenizer`); cross-attention, adapter and projections start new.
    With `vision_pretrained`, the rest of `vision` applies on top of the checkpoint: `config` overrides
    its config, and `pool`, a stem, `image_mean` / `image_std` as for an encoder built from scratch.
    A decoder built from a config gets a byte-level BPE trained on `texts` (required then).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    from encoders import build_encoder

    if isinstance(config, str):
        config = MMGPTConfig.from_preset(config)
    elif isinstance(config, dict):
        config = MMGPTConfig(**config)
    vision_spec = dict(config.vision)
    text = dict(config.text)

    vision = None
    if config.vision_pretrained:
        # The rest of `vision` applies on top of the checkpoint: `config` overrides its config (e.g.
        # image_size), `pool`, a stem, image_mean / image_std; build_encoder checks them.
        options = {k: vision_spec[k] for k in _VISION_OPTIONS if k in vision_spec}
        vision = build_encoder(
            vision_spec["backend"], config=vision_spec.get("config") or {}, pretrained=config.vision_pretrained,
            attn_implementation=attn_implementation, **options,
        )
        _mark_initialised(vision)
        vision_spec = vision.config_dict()

    decoder = None
    if config.text_pretrained and config.fusion == "prefix":
        # fp32 like the rest of the model (checkpoints such as Qwen2.5 are stored in bf16); mixed precision
        # is the trainer's business.
        decoder = AutoModelForCausalLM.from_pretrained(
            config.text_pretrained, attn_implementation=attn_implementation, dtype=torch.float32
        )
        _mark_initialised(decoder)
    elif config.text_pretrained:
        from transformers import AutoConfig

        kind = AutoConfig.from_pretrained(config.text_pretrained).model_type
        if kind != "gpt2":  # GPT2LMHeadModel would load none of its weights and train a random GPT-2
            raise ValueError(
                f"text_pretrained {config.text_pretrained!r} is a {kind} model; cross-attention fusion needs a "
                "GPT-2 decoder. For any other causal LM use prefix fusion: fusion='prefix' (a prefix preset "
                "such as 'tiny-prefix', or model.preset=tiny-prefix in a training config)")
        decoder = GPT2LMHeadModel.from_pretrained(
            config.text_pretrained, add_cross_attention=True, attn_implementation=attn_implementation
        )
        for name, module in decoder.named_modules():
            if "crossattention" not in name and "ln_cross_attn" not in name:
                module._is_hf_initialized = True
    if decoder is not None:
        tokenizer = AutoTokenizer.from_pretrained(config.text_pretrained)
        if config.fusion == "prefix" and IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
            if len(tokenizer) > decoder.get_input_embeddings().num_embeddings:
                decoder.resize_token_embeddings(len(tokenizer))
        text = {k: v for k, v in decoder.config.to_dict().items() if k not in ("architectures", "transformers_version")}
    else:
        if texts is None:
            raise ValueError(
                "a decoder built from a config needs training texts for its tokenizer: pass texts=[...] "
                "(or set text_pretrained to a pretrained decoder such as 'gpt2')"
            )
        tok_spec = config.tokenizer or {}
        tokenizer = train_bpe_tokenizer(texts, vocab_size=int(tok_spec.get("vocab_size", 1024)))
        if config.fusion == "prefix":  # conversations: where each image's tokens go in the text
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        text["vocab_size"] = len(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text["bos_token_id"] = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    text["eos_token_id"] = tokenizer.eos_token_id
    text["pad_token_id"] = tokenizer.pad_token_id

    cfg = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        cfg.pop(key, None)
    cfg.update(vision=vision_spec, text=text)
    cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = (
        text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]
    )
    if config.fusion == "prefix":
        cfg["image_token_id"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = MMGPTConfig(**cfg)
    config._attn_implementation = attn_implementation
    model = MMGPTModel(config, vision=vision, decoder=decoder)
    model.generation_config.bos_token_id = text["bos_token_id"]
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    enc = model.vision
    processor = MMGPTProcessor(
        tokenizer,
        image_size=enc.image_size,
        image_mean=enc.image_mean,
        image_std=enc.image_std,
        max_length=_max_text_length(model),
        chat_template=getattr(tokenizer, "chat_template", None) if decoder is not None else None,
        image_token=IMAGE_TOKEN if model.uses_prefix else None,
        num_image_tokens=num_image_tokens(model) if model.uses_prefix else 0,
    )
    return model, processor


def _max_text_length(model: MMGPTModel) -> int:
    """Tokens of text that fit the decoder's positions (after the image tokens, with prefix fusion)."""
    n = int(getattr(model.config.text_config, "max_position_embeddings", None) or 1024)
    if model.uses_prefix:
        n -= num_image_tokens(model)
    if n < 8:
        raise ValueError(f"the decoder has no room for text: {n} positions left after the image tokens")
    return min(n, 1024)
