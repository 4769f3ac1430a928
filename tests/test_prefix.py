"""Prefix fusion with Llama-style and Qwen2-style decoders, and LoRA on the decoder: against a hand-built
`[image tokens][text]` pass of the decoder itself, a hand-computed cross entropy, cached vs uncached and
batched vs one-by-one generation, save/load, merged vs unmerged LoRA."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmgpt import MMGPTConfig, MMGPTModel, MMGPTProcessor, build_model
from mmgpt.processor import train_bpe_tokenizer
from train.config import TrainConfig
from train.parts import apply_freezing_and_lora, merge_lora

VIT = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
K = (32 // 8) ** 2 + 1  # image tokens in front of the text: 16 patches + CLS
IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
DECODERS = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64, vocab_size=120, **IDS),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64, vocab_size=120, **IDS),
}
GPT2 = dict(n_embd=64, n_layer=3, n_head=4, n_positions=48, vocab_size=120, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **IDS)
TEXTS = ["a large red circle", "a small blue square and a large green triangle",
         "question: what color is the circle? answer: red", "question: how many objects are there? answer: two"]


def make_model(decoder="llama", seed=0, **over) -> MMGPTModel:
    torch.manual_seed(seed)
    text = DECODERS[decoder] if isinstance(decoder, str) else decoder
    kw = dict(vision={"backend": "vit", "config": VIT}, text=text, adapter={"type": "mlp"}, projection_dim=32, **IDS)
    model = MMGPTModel(MMGPTConfig(**{**kw, **over})).eval()
    for key, value in IDS.items():
        setattr(model.generation_config, key, value)
    return model


def left_padded(prompts, pad=1):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def reference_logits(model, pixels, ids, mask):
    """The decoder run by hand on `[image tokens][text]`: (B, K + T, V)."""
    tokens = model.adapter(model.vision(pixels).patch_tokens)  # (B, K, D)
    x = torch.cat([tokens, model.decoder.get_input_embeddings()(ids)], dim=1)  # (B, K + T, D)
    full_mask = torch.cat([torch.ones(ids.shape[0], tokens.shape[1], dtype=torch.long), mask], dim=1)
    return model.decoder(inputs_embeds=x, attention_mask=full_mask).logits


# --- config ----------------------------------------------------------------------------------------


def test_fusion_defaults_text_config_class_and_errors():
    gpt2 = MMGPTConfig(text=GPT2)
    assert gpt2.fusion == "cross_attention" and gpt2.text["model_type"] == "gpt2"
    assert type(gpt2.text_config).__name__ == "GPT2Config" and gpt2.text_config.add_cross_attention
    gpt2_prefix = MMGPTConfig(text=GPT2, fusion="prefix")
    assert not gpt2_prefix.text_config.add_cross_attention
    for name, cls in (("llama", "LlamaConfig"), ("qwen2", "Qwen2Config")):
        cfg = MMGPTConfig(text=DECODERS[name])
        assert cfg.fusion == "prefix" and type(cfg.text_config).__name__ == cls
        assert not getattr(cfg.text_config, "add_cross_attention", False)
        assert cfg.text_config.num_key_value_heads == 2
    with pytest.raises(ValueError, match="unimodal_layers must be 0"):
        MMGPTConfig(text=DECODERS["llama"], unimodal_layers=1)
    with pytest.raises(ValueError, match="needs a GPT-2 decoder"):
        MMGPTConfig(text=DECODERS["llama"], fusion="cross_attention")
    # Saved configs round-trip the decoder type.
    again = MMGPTConfig.from_dict(MMGPTConfig(text=DECODERS["qwen2"]).to_dict())
    assert again.fusion == "prefix" and type(again.text_config).__name__ == "Qwen2Config"


# --- forward and losses ----------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_forward_equals_the_decoder_run_by_hand_on_image_tokens_then_text(decoder):
    model = make_model(decoder, seed=1)
    assert type(model.decoder).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[decoder]
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(2, 120, (2, 7))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        ref = reference_logits(model, pixels, ids, mask)
        other = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 7, 120)
    real = mask.bool()  # padding positions have no defined output
    assert torch.allclose(out.logits[real], ref[:, K:][real], atol=1e-5), (out.logits[real] - ref[:, K:][real]).abs().max()
    assert not torch.allclose(out.logits, other.logits, atol=1e-3)  # the text sees the image
    # Left padding: [image][pad pad][text] gives the text the positions of [image][text].
    left_ids, left_mask = left_padded([ids[1, :5].tolist()], pad=1)
    left_ids, left_mask = F.pad(left_ids, (2, 0), value=1), F.pad(left_mask, (2, 0))
    with torch.no_grad():
        left = model(input_ids=left_ids, attention_mask=left_mask, pixel_values=pixels[1:])
    assert torch.allclose(left.logits[0, 2:], ref[1, K:K + 5], atol=1e-5)


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_lm_loss_counts_only_target_positions(decoder):
    proc = MMGPTProcessor(train_bpe_tokenizer(TEXTS, vocab_size=300), image_size=32)
    model = make_model({**DECODERS[decoder], "vocab_size": len(proc.tokenizer)}, seed=3)
    batch = proc.batch_examples(["vqa", "caption"], ["what color is the circle?", ""], ["red", "a large red circle"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (labels == -100).any(dim=1).all() and (mask == 0).any()
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, compute_itc=False)
        ref = reference_logits(model, pixels, ids, mask)  # (B, K + T, V)
    # Hand-computed: text token t+1 is predicted at sequence position K + t; prompt, BOS, padding (-100)
    # and the image positions (no label at all) are left out.
    terms = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != -100:
                terms.append(-torch.log_softmax(ref[b, K + t], dim=-1)[target])
    expect = torch.stack(terms).mean()
    n_targets = int((labels[:, 1:] != -100).sum())
    assert len(terms) == n_targets < int(mask.sum())
    assert torch.allclose(out.lm_loss, expect, atol=1e-5), (out.lm_loss, expect)


@pytest.mark.parametrize("decoder", ["llama", "qwen2", "gpt2"])
def test_training_loss_runs_the_head_on_target_rows_only_and_matches_full_logits(decoder, monkeypatch):
    """In training with labels, prefix fusion runs the base model and the LM head only on rows with a
    target (the full (B, T, V) logits are never made): the loss and every gradient equal those of
    the full-logits path (return_logits=True)."""
    proc = MMGPTProcessor(train_bpe_tokenizer(TEXTS, vocab_size=300), image_size=32)
    text = GPT2 if decoder == "gpt2" else DECODERS[decoder]
    model = make_model({**text, "vocab_size": len(proc.tokenizer)}, seed=5, fusion="prefix").train()
    batch = proc.batch_examples(["vqa", "caption"], ["what color is the circle?", ""], ["red", "a large red circle"])
    torch.manual_seed(6)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
              pixel_values=torch.randn(2, 3, 32, 32))
    results = []
    for full in (False, True):
        model.zero_grad()
        out = model(**kw, return_logits=full)
        assert (out.logits is None) != full
        out.loss.backward()
        results.append((out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    # A decoder type not known to have a plain LM head (Gemma 2 soft-caps its logits) keeps full logits.
    import mmgpt.prefix

    monkeypatch.setattr(mmgpt.prefix, "PLAIN_HEAD_TYPES", set())
    out = model(**kw)
    assert out.logits is not None
    torch.testing.assert_close(out.lm_loss.detach(), loss_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_itc_text_embedding_comes_from_an_image_free_pass(decoder):
    model = make_model(decoder, seed=5)
    torch.manual_seed(6)
    ids = torch.randint(2, 120, (3, 6))
    ids[:, 0], ids[:, -1] = 0, 1
    ids[2, 4], ids[2, 5] = 1, 1  # row 2: EOS at 4, then padding
    mask = torch.ones_like(ids)
    mask[2, 5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    a = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 32, 32), labels=labels)
    b = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 32, 32), labels=labels)
    assert a.itc_loss is not None and torch.allclose(a.loss, a.lm_loss + a.itc_loss)
    assert torch.allclose(a.text_embeds, b.text_embeds, atol=1e-6)  # the image does not reach it
    assert not torch.allclose(a.lm_loss, b.lm_loss)  # while the LM pass sees it
    # Reference: the decoder's own hidden states (output_hidden_states, last = after the final norm) at EOS,
    # each text alone without padding.
    for row, eos in ((0, 5), (2, 4)):
        with torch.no_grad():
            h = model.decoder(input_ids=ids[row:row + 1, :eos + 1], output_hidden_states=True).hidden_states[-1]
        expect = F.normalize(model.text_proj(h[0, eos]), dim=-1)
        assert torch.allclose(a.text_embeds[row], expect, atol=1e-5)
        assert torch.allclose(model.embed_text(ids, mask)[row], expect, atol=1e-5)


# --- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_generation_cached_equals_uncached_and_batched_equals_one_by_one(decoder):
    model = make_model(decoder, seed=7)
    assert not model._can_use_fast_path({"max_new_tokens": 8})
    torch.manual_seed(8)
    pixels = torch.randn(3, 3, 32, 32)
    prompts = [[0, 5, 6, 7, 8], [0, 9], [0, 10, 11, 12]]
    ids, mask = left_padded(prompts)
    w = ids.shape[1]
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    uncached = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    seqs = cached.sequences
    assert seqs.shape == (3, w + 8) and torch.equal(seqs[:, :w], ids)  # prompt + new tokens
    assert torch.equal(seqs, uncached.sequences)
    logits = torch.stack(cached.logits, 1)  # (B, new, V) raw next-token logits
    assert torch.allclose(logits, torch.stack(uncached.logits, 1), atol=1e-5)
    for i, p in enumerate(prompts):
        one = model.generate(pixel_values=pixels[i:i + 1], input_ids=torch.tensor([p]), **kw)
        assert torch.equal(one.sequences[0, len(p):], seqs[i, w:]), i
        assert torch.allclose(torch.stack(one.logits, 1)[0], logits[i], atol=1e-5), i
        # Reference: the decoder by hand over [image][prompt][tokens generated so far], no padding.
        full = torch.cat([torch.tensor(p), seqs[i, w:]]).unsqueeze(0)  # (1, P + new)
        with torch.no_grad():
            ref = reference_logits(model, pixels[i:i + 1], full, torch.ones_like(full))
        assert torch.allclose(ref[0, K + len(p) - 1:-1], logits[i], atol=1e-5), i
    beams = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=6)
    assert beams.shape[0] == 3
    caption = model.generate(pixel_values=pixels, max_new_tokens=4, min_new_tokens=4)  # BOS only
    assert caption.shape == (3, 5) and (caption[:, 0] == 0).all()


# --- persistence and building ----------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_save_load_round_trip_is_bit_exact(tmp_path, decoder):
    text = {k: v for k, v in DECODERS[decoder].items() if not k.endswith("token_id") and k != "vocab_size"}
    cfg = dict(vision={"backend": "vit", "config": VIT}, text=text, adapter={"type": "resampler", "num_queries": 6},
               projection_dim=32, tokenizer={"vocab_size": 200})
    model, processor = build_model(cfg, texts=TEXTS)
    model.eval()
    assert processor.max_length == 64 - 6  # decoder positions left after the 6 image tokens
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text"]["model_type"] == decoder
    loaded = MMGPTModel.from_pretrained(tmp_path).eval()
    assert type(loaded.decoder) is type(model.decoder)
    sd1, sd2 = model.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    proc2 = MMGPTProcessor.from_pretrained(tmp_path)
    batch = proc2.batch_examples(["caption", "vqa"], ["", "what color is the circle?"], ["a large red circle", "red"])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(pixel_values=px, **batch)
        b = loaded(pixel_values=px, **batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    prompt = proc2.batch_prompts(["vqa", "caption"], ["what color is the circle?", ""])
    gen = dict(max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(model.generate(pixel_values=px, **prompt, **gen), loaded.generate(pixel_values=px, **prompt, **gen))


def test_tiny_prefix_preset_builds_and_the_pipeline_answers(tmp_path):
    import mmgpt

    model, processor = build_model("tiny-prefix", texts=TEXTS)
    cfg = model.decoder.config
    assert type(model.decoder).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (128, 2, 4, 2, 512, 128)
    assert cfg.vocab_size == len(processor.tokenizer) and processor.max_length == 128 - 65
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    vl = mmgpt.load(tmp_path)
    from PIL import Image

    image = Image.new("RGB", (64, 64), (230, 230, 230))
    assert isinstance(vl.caption(image, max_new_tokens=3), str)
    answer = vl.ask(image, "what color is the circle?", max_new_tokens=3)
    assert "".join(vl.stream_answer(image, "what color is the circle?", max_new_tokens=3)) == answer
    assert vl.similarity([image], ["a red circle", "a blue square"]).shape == (1, 2)


def test_pretrained_causal_lm_and_its_tokenizer_load_by_folder(tmp_path):
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=150)
    torch.manual_seed(9)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, max_position_embeddings=96, vocab_size=len(tokenizer),
                                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model, processor = build_model(dict(vision={"backend": "vit", "config": VIT}, text_pretrained=str(tmp_path / "lm"),
                                        text={"model_type": "llama"}, fusion="prefix", projection_dim=32))
    assert type(model.decoder).__name__ == "LlamaForCausalLM" and model.decoder.dtype == torch.float32
    for key, value in lm.state_dict().items():  # the weights are the saved ones, not a fresh init
        got = model.decoder.state_dict()[key]
        if "embed_tokens" in key or "lm_head" in key:  # one row more: the <image> placeholder conversations use
            assert got.shape[0] == value.shape[0] + 1
            got = got[: value.shape[0]]
        assert torch.equal(got, value), key
    added = {"<image>": len(tokenizer)}
    assert processor.tokenizer.get_vocab() == {**tokenizer.get_vocab(), **added} and processor.max_length == 96 - K
    assert model.config.image_token_id == len(tokenizer) and processor.image_token == "<image>"
    assert model.decoder.lm_head.weight is model.decoder.get_input_embeddings().weight  # tied, as saved
    model.eval().save_pretrained(tmp_path / "mm")
    loaded = MMGPTModel.from_pretrained(tmp_path / "mm").eval()
    assert loaded.decoder.lm_head.weight is loaded.decoder.get_input_embeddings().weight
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the same folder under cross-attention fusion loaded none of its weights into a random GPT-2 before
    with pytest.raises(ValueError, match="llama model; cross-attention fusion needs a GPT-2.*fusion='prefix'"):
        build_model(dict(vision={"backend": "vit", "config": VIT}, text_pretrained=str(tmp_path / "lm"),
                         projection_dim=32))


# --- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
def test_a_few_training_steps_lower_both_losses(decoder):
    model = make_model(decoder, seed=10).train()
    torch.manual_seed(11)
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.randint(2, 120, (4, 6))
    ids[:, 0], ids[:, -1] = 0, 1
    labels = ids.clone()
    labels[:, 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        first = first or (out.lm_loss.item(), out.itc_loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.lm_loss.item() < 0.5 * first[0], (first, out.lm_loss.item())
    assert out.itc_loss.item() < 0.5 * first[1], (first, out.itc_loss.item())


# --- LoRA ------------------------------------------------------------------------------------------


def lora_config(r=4) -> TrainConfig:
    cfg = TrainConfig()
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = True, r, 8, 0.0
    return cfg


def test_lora_trainable_parameters_equal_the_hand_count():
    r = 4
    # Llama-style, width 64, 4 heads of 16, 2 KV heads -> k/v project 64 -> 32; targets q, k, v, o.
    model = apply_freezing_and_lora(make_model("llama"), lora_config(r))
    per_layer = r * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    trainable = {n: p.numel() for n, p in model.decoder.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable) and sum(trainable.values()) == 2 * per_layer
    others = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder."))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer + others
    # GPT-2 with cross-attention, width 64 (Conv1D, fan_in_fan_out): c_attn 64->192, attn c_proj 64->64,
    # crossattention c_attn 64->128, q_attn 64->64, c_proj 64->64, mlp c_proj 256->64; 3 layers.
    model = apply_freezing_and_lora(make_model(GPT2), lora_config(r))
    per_layer = r * ((64 + 192) + (64 + 64) + (64 + 128) + (64 + 64) + (64 + 64) + (256 + 64))
    trainable = {n: p.numel() for n, p in model.decoder.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable) and sum(trainable.values()) == 3 * per_layer


def test_unmerged_lora_decodes_with_its_adapters_on_the_fast_greedy_path():
    """GPT-2 with LoRA in training (adapters not merged): mmgpt's fast greedy loop folds each adapter's
    delta into its weights and gives GenerationMixin's tokens (it decoded with the base weights)."""
    model = apply_freezing_and_lora(make_model(GPT2, seed=12), lora_config(4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # B starts at zero: make the adapters matter
    assert model._can_use_fast_path({"max_new_tokens": 10})
    torch.manual_seed(13)
    pixels = torch.randn(3, 3, 32, 32)
    for b in (1, 3):
        kw = dict(pixel_values=pixels[:b], max_new_tokens=10, min_new_tokens=10)
        assert torch.equal(model.generate(**kw), model.generate(**kw, fast=False)), b


@pytest.mark.parametrize("decoder", ["qwen2", "gpt2"])
def test_merged_lora_gives_the_outputs_of_unmerged_and_saves_plain_weights(tmp_path, decoder):
    model = make_model(GPT2 if decoder == "gpt2" else DECODERS[decoder], seed=12)
    torch.manual_seed(13)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(2, 120, (2, 6))
    ids[:, 0] = 0
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pixels, labels=ids)
    apply_freezing_and_lora(model, lora_config()).eval()
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a trained-looking update (B starts at zero)
        unmerged = model(input_ids=ids, pixel_values=pixels, labels=ids)
        assert not torch.allclose(unmerged.logits, base.logits, atol=1e-3)
        merge_lora(model)
        merged = model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(merged.logits, unmerged.logits, atol=1e-5), (merged.logits - unmerged.logits).abs().max()
    assert torch.allclose(merged.text_embeds, unmerged.text_embeds, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))
    loaded = MMGPTModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = loaded(input_ids=ids, pixel_values=pixels, labels=ids)
    assert torch.equal(again.logits, merged.logits)


def test_training_entry_point_runs_the_prefix_recipe_with_lora_and_exports_merged_weights(tmp_path, capsys):
    from pathlib import Path

    from train.main import main

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    rc = main([str(root / "configs/train/shapes-tiny-prefix.yaml"), "progress=false", "log_every=1", "batch_size=4",
               "data.train=[{format: shapes, split: train, size: 32, task_mix: {caption: 1, vqa: 2}}]",
               "data.num_workers=0", "model.tokenizer_texts=200", "max_steps=3", "optim.warmup_steps=1",
               "data.validation=null", "lora.enabled=true", "lora.r=4", f"output_dir={out}"])
    assert rc == 0
    assert "lora.enabled on a decoder with random weights" in capsys.readouterr().out  # tiny-prefix: no checkpoint
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]
    assert not any("lora" in k for k in load_file(out / "model" / "model.safetensors"))
    model = MMGPTModel.from_pretrained(out / "model")
    assert model.config.fusion == "prefix" and type(model.decoder).__name__ == "LlamaForCausalLM"
