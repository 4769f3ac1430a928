"""Model core against independent references: transformers' VisionEncoderDecoder, hand-computed ITC,
cached vs uncached generation, one-by-one vs batched, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTModel,
)

from mmgpt import MMGPTConfig, MMGPTModel, MMGPTProcessor, build_model
from mmgpt.losses import contrastive_loss

VIT = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT = dict(n_embd=64, n_layer=3, n_head=4, n_positions=48, vocab_size=120, resid_pdrop=0.0, embd_pdrop=0.0,
           attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def make_model(seed=0, **over) -> MMGPTModel:
    torch.manual_seed(seed)
    kw = dict(vision={"backend": "vit", "config": VIT}, text=GPT, adapter={"type": "linear"}, projection_dim=32,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = MMGPTConfig(**{**kw, **over})
    model = MMGPTModel(cfg).eval()
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 1
    return model


def left_padded_prompts():
    """Three prompts of different lengths, left-padded with id 1: (prompts, ids (3, W), mask (3, W))."""
    prompts = [[0, 5, 6, 7, 8], [0, 9], [0, 10, 11, 12]]
    width = max(map(len, prompts))
    ids = torch.full((3, width), 1)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return prompts, ids, mask


def make_ved_with_same_weights(model: MMGPTModel) -> VisionEncoderDecoderModel:
    enc = ViTModel(ViTConfig(**VIT))
    dec = GPT2LMHeadModel(GPT2Config(**GPT, add_cross_attention=True, is_decoder=True))
    ved = VisionEncoderDecoderModel(encoder=enc, decoder=dec).eval()
    missing = ved.encoder.load_state_dict(model.vision.model.state_dict(), strict=False)
    assert not missing.missing_keys or all("pooler" in k for k in missing.missing_keys)
    ved.decoder.load_state_dict(model.decoder.state_dict())
    ved.enc_to_dec_proj.load_state_dict(model.adapter.proj.state_dict())
    return ved


def test_logits_and_greedy_tokens_match_vision_encoder_decoder():
    model = make_model()
    ved = make_ved_with_same_weights(model)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(2, 120, (3, 9))
    ids[:, 0] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        ref = ved(pixel_values=pixels, decoder_input_ids=ids).logits
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()

    ours_tok = model.generate(pixel_values=pixels, max_new_tokens=10, do_sample=False)
    ref_tok = ved.generate(pixel_values=pixels, max_new_tokens=10, do_sample=False, decoder_start_token_id=0,
                           eos_token_id=1, pad_token_id=1)
    assert ours_tok.shape == ref_tok.shape
    assert torch.equal(ours_tok, ref_tok)


def test_cached_and_uncached_generation_agree_and_batch_matches_one_by_one():
    model = make_model(seed=3)
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32)
    prompts, ids, mask = left_padded_prompts()
    width = ids.shape[1]
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    uncached = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    for i, p in enumerate(prompts):
        one = model.generate(pixel_values=pixels[i:i + 1], input_ids=torch.tensor([p]), **kw)
        assert torch.equal(one[0, len(p):], cached[i, width:]), i
    beams = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=6)
    assert beams.shape[0] == 3


def test_itc_loss_equals_hand_computed_value():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = [[10.0 * float(img[i] @ txt[j]) for j in range(4)] for i in range(4)]

    def ce_row(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    i2t = sum(ce_row(logits[i], i) for i in range(4)) / 4
    t2i = sum(ce_row([logits[j][i] for j in range(4)], i) for i in range(4)) / 4
    assert abs(contrastive_loss(img, txt, scale).item() - (i2t + t2i) / 2) < 1e-5

    # Duplicate captions (same group) share the target: rows 0 and 1 are both positives of each other.
    groups = torch.tensor([7, 7, 3, 4])
    got = contrastive_loss(img, txt, scale, groups).item()
    tgt = [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]

    def soft_ce(row, t):
        lse = math.log(sum(math.exp(v) for v in row))
        return -sum(t[j] * (row[j] - lse) for j in range(4))

    i2t = sum(soft_ce(logits[i], tgt[i]) for i in range(4)) / 4
    t2i = sum(soft_ce([logits[j][i] for j in range(4)], tgt[i]) for i in range(4)) / 4
    assert abs(got - (i2t + t2i) / 2) < 1e-5


def test_itc_hard_negatives_join_only_their_own_images_softmax():
    torch.manual_seed(1)
    img = F.normalize(torch.randn(3, 8), dim=-1)
    txt = F.normalize(torch.randn(3, 8), dim=-1)
    neg = F.normalize(torch.randn(4, 8), dim=-1)
    owner = torch.tensor([2, 0, 2, 2])  # image 0 has one negative, image 1 none, image 2 three
    scale = torch.tensor(7.0)
    lg = [[7.0 * float(img[i] @ txt[j]) for j in range(3)] for i in range(3)]
    extra = {i: [7.0 * float(img[i] @ neg[n]) for n in range(4) if int(owner[n]) == i] for i in range(3)}

    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    i2t = sum(ce(lg[i] + extra[i], i) for i in range(3)) / 3  # negatives widen image i's row only
    t2i = sum(ce([lg[j][i] for j in range(3)], i) for i in range(3)) / 3  # text -> image: unchanged
    got = contrastive_loss(img, txt, scale, negatives=neg, negative_owner=owner)
    assert abs(got.item() - (i2t + t2i) / 2) < 1e-5
    # with groups (soft targets) and without negatives the new path agrees with the old one
    groups = torch.tensor([5, 6, 5])
    empty = torch.zeros(0, 8)
    same = contrastive_loss(img, txt, scale, groups, negatives=empty, negative_owner=torch.zeros(0, dtype=torch.long))
    assert torch.allclose(same, contrastive_loss(img, txt, scale, groups), atol=1e-6)
    # a negative equal to the true caption makes that image's row strictly harder
    harder = contrastive_loss(img, txt, scale, negatives=txt[1:2].clone(), negative_owner=torch.tensor([1]))
    assert harder > contrastive_loss(img, txt, scale)


def test_unimodal_split_reads_text_embedding_from_k_image_free_layers():
    k = 2
    model = make_model(seed=4, unimodal_layers=k)
    for block in model.decoder.transformer.h[:k]:
        assert not hasattr(block, "crossattention")
    assert hasattr(model.decoder.transformer.h[k], "crossattention")
    torch.manual_seed(5)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(2, 120, (2, 7))
    ids[:, 0] = 0
    ids[:, -1] = 1
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # second row: EOS at position 4
    ids[1, 4] = 1
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids.masked_fill(mask == 0, -100))

    # Reference: a plain k-layer GPT-2 (no cross-attention) with the same weights, read at EOS.
    ref = GPT2Model(GPT2Config(**{**GPT, "n_layer": k})).eval()
    sd = {k_: v for k_, v in model.decoder.transformer.state_dict().items() if not k_.startswith("ln_f")}
    sd = {k_: v for k_, v in sd.items() if not k_.startswith("h.") or int(k_.split(".")[1]) < k}
    ref.load_state_dict(sd, strict=False)
    with torch.no_grad():
        x = ref.wte(ids) + ref.wpe(torch.arange(7).unsqueeze(0))
        for blk in ref.h:
            x = blk(x)
        last = mask.sum(-1) - 1
        feat = x[torch.arange(2), last]
        expect = F.normalize(model.text_proj(model.text_norm(feat)), dim=-1)
    assert torch.allclose(out.text_embeds, expect, atol=1e-5)
    assert torch.allclose(model.embed_text(ids, mask), expect, atol=1e-5)
    assert out.itc_loss is not None and out.lm_loss is not None


def test_forward_output_fields_are_stable():
    model = make_model()
    ids = torch.zeros(2, 4, dtype=torch.long)
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32))
    assert out.loss is None and out.itc_loss is None and out.logits.shape == (2, 4, 120)
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), labels=ids)
    assert set(out.keys()) >= {"loss", "lm_loss", "itc_loss", "logits", "image_embeds", "text_embeds"}
    assert torch.allclose(out.loss, out.lm_loss + out.itc_loss)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, processor = build_model("tiny", texts=["a large red circle", "a small blue square and a big one"])
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = MMGPTModel.from_pretrained(tmp_path).eval()
    proc2 = MMGPTProcessor.from_pretrained(tmp_path)
    sd1, sd2 = model.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    batch = processor.batch_examples(["caption", "vqa"], ["", "what color is it?"], ["a large red circle", "red"])
    batch2 = proc2.batch_examples(["caption", "vqa"], ["", "what color is it?"], ["a large red circle", "red"])
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(pixel_values=px, labels=batch["labels"], **{k: batch[k] for k in ("input_ids", "attention_mask")})
        b = loaded(pixel_values=px, labels=batch["labels"], **{k: batch[k] for k in ("input_ids", "attention_mask")})
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert torch.equal(model.generate(pixel_values=px, max_new_tokens=5), loaded.generate(pixel_values=px, max_new_tokens=5))


def test_processor_masks_prompt_and_padding():
    _, proc = build_model("tiny", texts=["a large red circle", "question: what color is the circle? answer: red"])
    batch = proc.batch_examples(["caption", "vqa"], ["", "what color is the circle?"], ["a large red circle", "red"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt = proc.encode_prompt("vqa", "what color is the circle?")
    assert labels[1, : len(prompt)].eq(-100).all()
    assert proc.decode(ids[1, len(prompt):]) == "red"
    assert labels[0, 0] == -100 and proc.decode(ids[0, 1:]) == "a large red circle"
    assert (labels[mask == 0] == -100).all()


def test_batched_tokenization_gives_the_per_record_ids():
    """batch_examples / batch_prompts tokenize a batch in one call: the same ids, labels and padding as
    encode_example / encode_prompt record by record (an empty caption prompt, truncation, left padding)."""
    texts = ["a large red circle", "question: what color is the circle? answer: red", "caption: two small squares"]
    _, proc = build_model("tiny", texts=texts)
    tasks, prompts = ["caption", "vqa", "vqa", "caption"], ["", "what color is the circle?", "how many?", ""]
    targets = ["a large red circle", "red", "2", "two small squares " * 40]  # the last one is cut at max_length
    batch = proc.batch_examples(tasks, prompts, targets)
    for i, (t, p, y) in enumerate(zip(tasks, prompts, targets)):
        ids, labels = proc.encode_example(t, p, y)
        assert batch["input_ids"][i, : len(ids)].tolist() == ids and batch["labels"][i, : len(ids)].tolist() == labels
        assert batch["attention_mask"][i].sum() == len(ids) and (batch["input_ids"][i, len(ids):] == proc.pad_id).all()
    assert batch["input_ids"].shape[1] == proc.max_length
    left = proc.batch_prompts(tasks, prompts)
    for i, (t, p) in enumerate(zip(tasks, prompts)):
        ids = proc.encode_prompt(t, p)
        assert left["input_ids"][i, -len(ids):].tolist() == ids and left["attention_mask"][i].sum() == len(ids)


@pytest.mark.parametrize("adapter", ["mlp", "resampler"])
def test_overfitting_one_batch_drives_both_losses_down(adapter):
    torch.manual_seed(0)
    model = make_model(seed=0, adapter={"type": adapter, **({"num_queries": 8} if adapter == "resampler" else {})},
                       unimodal_layers=1).train()
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.randint(2, 120, (4, 6))
    ids[:, 0] = 0
    ids[:, -1] = 1
    labels = ids.clone()
    labels[:, 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.lm_loss.item() < 0.05, out.lm_loss.item()
    assert out.itc_loss.item() < 0.05, out.itc_loss.item()


def test_fast_greedy_path_gives_the_tokens_of_generation_mixin():
    for k in (0, 1):
        model = make_model(seed=7, unimodal_layers=k)
        torch.manual_seed(8)
        pixels = torch.randn(3, 3, 32, 32)
        _, ids, mask = left_padded_prompts()
        assert model._can_use_fast_path({"max_new_tokens": 9})
        for kw in ({"max_new_tokens": 9}, {"max_new_tokens": 9, "min_new_tokens": 9}):
            fast = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kw)
            slow = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, fast=False, **kw)
            assert torch.equal(fast, slow), (k, kw)
            fast = model.generate(pixel_values=pixels, **kw)
            slow = model.generate(pixel_values=pixels, fast=False, **kw)
            assert torch.equal(fast, slow), (k, kw)
    # Stops early once every row has its EOS, padding finished rows, as generate() does.
    model = make_model(seed=9)
    model.decoder.lm_head.weight.data[1] += 5.0 * model.decoder.transformer.ln_f.bias.data.sign()
    a = model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=12)
    b = model.generate(pixel_values=torch.randn(2, 3, 32, 32), max_new_tokens=12, fast=False)
    assert a.shape[1] <= 13 and b.shape[1] <= 13


def test_itc_text_grad_scale_scales_only_the_decoder_side_of_the_contrastive_gradient():
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(2, 120, (3, 6))
    ids[:, 0], ids[:, -1] = 0, 1
    grads, losses = [], []
    for scale in (1.0, 0.1):
        model = make_model(seed=7, itc_text_grad_scale=scale, lm_weight=0.0).train()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])  # the forward is unchanged
    full, scaled = grads
    torch.testing.assert_close(scaled["text_proj.weight"], full["text_proj.weight"])  # above the scaled point
    torch.testing.assert_close(scaled["image_proj.weight"], full["image_proj.weight"])  # the image side
    wte = "decoder.transformer.wte.weight"
    torch.testing.assert_close(scaled[wte], 0.1 * full[wte], rtol=1e-4, atol=1e-7)  # the shared decoder


def test_bow_loss_equals_hand_computed_per_token_cross_entropy_on_caption_rows():
    torch.manual_seed(5)
    model = make_model(seed=2, bow_weight=0.7).train()
    assert make_model(bow_weight=0.0).bow_head is None  # off: no extra weights in the checkpoint
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 5, 1], [0, 7, 8, 1, 1], [0, 9, 10, 11, 1]])  # rows 0, 1: captions; 2: a question
    labels = ids.clone()
    labels[1, 4] = -100  # padding
    labels[2, :3] = -100  # the question part of a VQA row
    image_index, itc_mask = torch.tensor([0, 1, 0]), torch.tensor([True, True, False])
    out = model(input_ids=ids, attention_mask=(labels != -100).long() | (ids != 1).long(), pixel_values=pixels,
                labels=labels, image_index=image_index, itc_mask=itc_mask)
    tokens = model.encode_image(pixels).tokens  # (2, K, D): what the decoder reads
    assert torch.allclose(model.bow_head.bias, torch.full((120,), -math.log(120)))  # a small prior at init
    z = model.bow_head(tokens.mean(1)).detach()  # (2, V)
    bags = [[0, 5, 6, 1], [0, 7, 8, 1]]  # target tokens of each caption row (5 counted once)
    want = 0.0
    for i, bag in enumerate(bags):
        for v in range(120):
            want = want - (math.log(torch.sigmoid(z[i, v])) if v in bag else math.log(1 - torch.sigmoid(z[i, v])))
    want = torch.tensor(want / 2)
    torch.testing.assert_close(out.bow_loss, want)
    torch.testing.assert_close(out.loss, out.lm_loss + out.itc_loss + 0.7 * out.bow_loss)
    model.config.lm_weight = model.config.itc_weight = 0.0  # the bag alone still trains the encoder
    model(input_ids=ids, pixel_values=pixels, labels=labels, image_index=image_index, itc_mask=itc_mask).loss.backward()
    assert model.bow_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters() if p.ndim == 2)


def test_adapter_positions_add_fixed_sincos_codes_at_a_share_of_the_token_scale():
    from encoders.stem import sincos_2d
    from mmgpt.adapter import MLPAdapter, build_adapter

    torch.manual_seed(0)
    plain = build_adapter({"type": "mlp"}, 48, 64)
    with_pos = build_adapter({"type": "mlp", "positions": 0.5}, 48, 64)
    with_pos.inner.load_state_dict(plain.state_dict())
    assert isinstance(with_pos.inner, MLPAdapter) and not list(with_pos.state_dict().keys() - {
        "inner." + k for k in plain.state_dict()})  # no weights of its own
    x = torch.randn(2, 1 + 16, 48)  # CLS + a 4x4 grid
    y, y0 = with_pos(x), plain(x)
    torch.testing.assert_close(y[:, 0], y0[:, 0])  # CLS: no position
    code = sincos_2d(4, 64)
    code = code / code.pow(2).mean().sqrt()
    for b in range(2):
        rms = y0[b, 1:].pow(2).mean().sqrt()
        torch.testing.assert_close(y[b, 1:], y0[b, 1:] + 0.5 * rms * code)
    y.sum().backward()  # the scale is not differentiated: the gradient is the plain adapter's
    g = with_pos.inner.fc2.weight.grad.clone()
    y0.sum().backward()
    torch.testing.assert_close(g, plain.fc2.weight.grad)
    with pytest.raises(ValueError, match="token-wise"):
        build_adapter({"type": "resampler", "positions": 0.5}, 48, 64)
    model = make_model(adapter={"type": "linear", "positions": 0.3})  # in a model: round trip via config
    assert model.adapter.scale == 0.3 and model(input_ids=torch.zeros(1, 3, dtype=torch.long),
                                                pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 3, 120)


def test_itc_with_question_texts_uses_every_image_a_text_is_true_of():
    torch.manual_seed(11)
    img = F.normalize(torch.randn(2, 8), dim=-1)  # images A, B
    txt = F.normalize(torch.randn(4, 8), dim=-1)  # rows: A caption, A question, B caption, B same question
    images = torch.tensor([7, 7, 9, 9])
    groups = torch.tensor([1, 5, 2, 5])  # rows 1 and 3 carry the identical text "q"
    scale = torch.tensor(3.0)
    got = contrastive_loss(img[[0, 0, 1, 1]], txt, scale, groups, images=images)
    # by hand: pos[i, j] = text j is one of image(i)'s texts
    pos = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float)
    logits = scale * img[[0, 0, 1, 1]] @ txt.t()
    i2t = -sum((pos[i] / pos[i].sum() * F.log_softmax(logits[i], 0)).sum() for i in range(4)) / 4
    t2i = -sum((pos[:, j] / pos[:, j].sum() * F.log_softmax(logits[:, j], 0)).sum() for j in range(4)) / 4
    torch.testing.assert_close(got, 0.5 * (i2t + t2i))
    # one caption per image: the same loss as the plain groups form
    two = contrastive_loss(img, txt[[0, 2]], scale, groups[[0, 2]], images=images[[0, 2]])
    torch.testing.assert_close(two, contrastive_loss(img, txt[[0, 2]], scale, groups[[0, 2]]))


@pytest.mark.parametrize("unimodal", [0, 1])
def test_rows_sharing_an_image_match_the_per_row_memory_path(unimodal):
    """Training rows that share images (image_index): keys/values projected once per image give the
    loss and every gradient of the plain path, which cross-attends to memory[image_index] row by row."""
    model = make_model(seed=4, unimodal_layers=unimodal).train()
    torch.manual_seed(5)
    pixels = torch.randn(3, 3, 32, 32)
    image_index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    ids = torch.randint(2, 120, (7, 6))
    mask = torch.ones(7, 6, dtype=torch.long)
    mask[4, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    itc_mask = torch.tensor([True, False, True, True, False, False, False])

    def run(shared: bool):
        model.zero_grad(set_to_none=True)
        kw = dict(input_ids=ids, attention_mask=mask, labels=labels, itc_mask=itc_mask)
        if shared:
            out = model(pixel_values=pixels, image_index=image_index, **kw)
        else:  # the reference: each row gets its own copy of its image's memory, through the HF blocks
            memory = model.encode_image(pixels).tokens[image_index]
            hidden, _, _ = model.run_decoder(ids, mask, memory)
            keep = labels[:, 1:] != -100
            logits = model.decoder.lm_head(hidden[:, :-1][keep])
            out = F.cross_entropy(logits, labels[:, 1:][keep])
            out.backward()
            return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.lm_loss.backward()
        return out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run(False)
    loss, grads = run(True)
    assert torch.allclose(loss, ref_loss, atol=1e-6), (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name
    # the shared path really ran: the blocks' own cross-attention saw no per-row memory
    seen = []
    hook = model.decoder.transformer.h[-1].crossattention.register_forward_hook(lambda m, a, k: seen.append(1))
    model(pixel_values=pixels, image_index=image_index, input_ids=ids, attention_mask=mask, labels=labels)
    hook.remove()
    assert not seen


def test_pretrained_vision_keeps_the_rest_of_the_vision_spec(tmp_path):
    """`vision_pretrained` loads the checkpoint, and `vision`'s config overrides and `pool` still apply
    (they were dropped silently: a mean-pooled recipe trained with CLS pooling)."""
    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(**VIT), add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path / "vit")
    cfg = MMGPTConfig(vision={"backend": "vit", "pool": "mean", "config": {"layer_norm_eps": 1e-5}},
                      vision_pretrained=str(tmp_path / "vit"), text=GPT, adapter={"type": "linear"},
                      projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model, _ = build_model(cfg, texts=["a large red circle", "a small blue square"])
    vit = model.vision.model
    assert vit.config.layer_norm_eps == 1e-5 and model.config.vision["pool"] == "mean"
    for key, value in ref.state_dict().items():
        assert torch.equal(vit.state_dict()[key], value), key
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.vision.eval()(px)
    assert out.patch_tokens.shape[1] == 17  # CLS + 16 patches; the mean leaves CLS out
    torch.testing.assert_close(out.pooled, out.patch_tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pool"):
        build_model(MMGPTConfig(**{**cfg.to_dict(), "vision": {"backend": "vit", "pool": "max"}}), texts=["a b"])


def test_generation_fits_the_decoders_positions():
    """GPT-2's learned positions end at n_positions: max_new_tokens past them is cut to what fits (with a
    warning; the tokens equal an uncut call's), and a prompt with no room left is a ValueError that says
    so (both were an IndexError inside generation)."""
    from mmgpt import build_model

    torch.manual_seed(0)
    model, _ = build_model("tiny", texts=["a red circle", "what color? red"])
    model.eval()
    limit = model.config.text_config.n_positions
    px = torch.randn(1, 3, 64, 64)
    for beams in (1, 2):
        with pytest.warns(UserWarning, match=f"cut to {limit - 1}"):
            long = model.generate(pixel_values=px, max_new_tokens=limit + 40, min_new_tokens=limit + 40,
                                  num_beams=beams)
        fits = model.generate(pixel_values=px, max_new_tokens=limit - 1, min_new_tokens=limit - 1, num_beams=beams)
        assert torch.equal(long, fits) and long.shape[1] == limit
    ids = torch.ones(1, limit, dtype=torch.long)
    with pytest.raises(ValueError, match=f"takes {limit} positions.*shorten the question"):
        model.generate(pixel_values=px, input_ids=ids, max_new_tokens=4)
