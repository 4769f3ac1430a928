"""encoders: the four Hugging Face backends, parity with plain transformers models, pretrained
folders, freezing, config round trips and the image transforms."""

import ast
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from encoders import (
    ENCODER_BACKENDS,
    EncoderOutput,
    VisionEncoder,
    build_encoder,
    build_image_transform,
    load_image,
)
from encoders.hf import BACKENDS
from mmgpt.speed import vit

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
PATCHES = (32 // 8) ** 2  # 16
TINY_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pixels(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


# --- backends -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, n_tokens",
    [("vit", PATCHES + 1), ("clip", PATCHES + 1), ("siglip", PATCHES), ("dinov2", PATCHES + 1)],
)
def test_backend_shapes(backend, n_tokens):
    enc = build_encoder(backend, TINY).eval()
    assert isinstance(enc, VisionEncoder) and enc.backend == backend
    assert (enc.hidden_size, enc.image_size, enc.num_tokens) == (32, 32, n_tokens)
    assert enc.model.config._attn_implementation == "sdpa"
    out = enc(pixels())
    assert isinstance(out, EncoderOutput)
    assert out.patch_tokens.shape == (2, n_tokens, 32)
    assert out.pooled.shape == (2, 32)
    assert all(k.startswith("model.") for k in enc.state_dict())


@pytest.mark.parametrize("backend", ["vit", "dinov2"])
def test_other_input_size_with_interpolated_positions(backend):
    enc = build_encoder(backend, TINY).eval()
    with torch.no_grad():
        out = enc(pixels(size=48), interpolate_pos_encoding=True)  # DINOv2 interpolates anyway
    assert out.patch_tokens.shape == (2, (48 // 8) ** 2 + 1, 32)


def test_backend_names_match_registry():
    assert ENCODER_BACKENDS == tuple(BACKENDS)


def test_pooled_per_backend():
    x = pixels()
    with torch.no_grad():
        for backend in ("vit", "dinov2"):  # CLS after the final layernorm
            out = build_encoder(backend, TINY).eval()(x)
            torch.testing.assert_close(out.pooled, out.patch_tokens[:, 0], rtol=0, atol=0)
        clip = build_encoder("clip", TINY).eval()
        out = clip(x)  # CLIP: post_layernorm(CLS); last_hidden_state is before that layernorm
        torch.testing.assert_close(out.pooled, clip.model.post_layernorm(out.patch_tokens[:, 0]))
        siglip = build_encoder("siglip", TINY).eval()
        out = siglip(x)  # SigLIP: the attention-pooling head over all tokens
        torch.testing.assert_close(out.pooled, siglip.model.head(out.patch_tokens))
        headless = build_encoder("siglip", {**TINY, "vision_use_head": False}).eval()
        out = headless(x)
        torch.testing.assert_close(out.pooled, out.patch_tokens.mean(dim=1))


def test_vit_matches_plain_transformers_model():
    enc = build_encoder("vit", TINY).eval()
    ref = ViTModel(ViTConfig(**TINY), add_pooling_layer=False).eval()
    ref.load_state_dict(enc.model.state_dict())
    assert ref.config._attn_implementation == "sdpa"
    x = pixels()
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        got = enc(x)
    assert torch.equal(got.patch_tokens, want)
    assert torch.equal(got.pooled, want[:, 0])

    eager = build_encoder("vit", TINY, attn_implementation="eager").eval()
    eager.load_state_dict(enc.state_dict())
    assert eager.model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(x).patch_tokens, want, rtol=1e-4, atol=1e-5)


def test_vit_pretrained_folder_with_image_processor(tmp_path):
    ref = ViTModel(ViTConfig(**TINY), add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)

    enc = build_encoder("vit", pretrained=str(tmp_path)).eval()
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == (0.4, 0.5, 0.6)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(enc(x).patch_tokens, ref(pixel_values=x).last_hidden_state)

    (tmp_path / "preprocessor_config.json").unlink()  # no processor config: the backend default
    assert build_encoder("vit", pretrained=str(tmp_path)).image_mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "backend, full_cls, config_cls", [("clip", CLIPModel, CLIPConfig), ("siglip", SiglipModel, SiglipConfig)]
)
def test_full_contrastive_checkpoint_loads_vision_tower(tmp_path, backend, full_cls, config_cls):
    full = full_cls(config_cls(vision_config=TINY, text_config=TINY_TEXT)).eval()
    full.save_pretrained(tmp_path)
    enc = build_encoder(backend, pretrained=str(tmp_path)).eval()
    want = full.vision_model.state_dict()
    got = enc.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(enc(x).pooled, full.vision_model(pixel_values=x).pooler_output)


def test_config_dict_round_trip():
    for backend in ENCODER_BACKENDS:
        enc = build_encoder(backend, TINY, image_mean=(0.1, 0.2, 0.3))
        cfg = enc.config_dict()
        cfg = json.loads(json.dumps(cfg))  # JSON-able
        assert cfg["backend"] == backend
        again = build_encoder(**cfg)
        assert again.config_dict() == cfg
        assert again.image_mean == (0.1, 0.2, 0.3)
        shapes = {k: v.shape for k, v in enc.state_dict().items()}
        assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def test_dinov2_accepts_intermediate_size():
    enc = build_encoder("dinov2", TINY)
    assert enc.model.config.mlp_ratio == 2
    assert enc.model.encoder.layer[0].mlp.fc1.out_features == 64


def test_bad_arguments():
    with pytest.raises(ValueError, match="vit, clip, siglip, dinov2"):
        build_encoder("resnet")
    with pytest.raises(ValueError, match="hiden_size"):
        build_encoder("vit", {"hiden_size": 32})


def test_freeze_keeps_eval_under_parent_train():
    enc = build_encoder("vit", TINY, freeze=True)
    assert enc.frozen
    assert not any(p.requires_grad for p in enc.parameters())
    parent = nn.ModuleDict({"encoder": enc, "head": nn.Linear(32, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in enc.modules())
    enc.unfreeze()
    parent.train()
    assert all(m.training for m in enc.modules())
    assert all(p.requires_grad for p in enc.parameters())


def test_encoders_imports_neither_mmgpt_nor_train():
    root = Path(__file__).resolve().parents[1] / "encoders"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"mmgpt", "train"}, f"{path.name} imports {name}"


# --- transforms -----------------------------------------------------------------------------------

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def noise_image(width=50, height=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("train", [False, True])
def test_constant_colour_normalized_by_hand(train):
    colour = (10, 100, 200)
    tf = build_image_transform(16, MEAN, STD, train=train)
    out = tf(Image.new("RGB", (50, 40), colour))
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 16, 16)
    for c in range(3):
        want = (colour[c] / 255 - MEAN[c]) / STD[c]
        torch.testing.assert_close(out[c], torch.full((16, 16), want), rtol=0, atol=1e-5)


def test_eval_transform_is_deterministic_resize_then_center_crop():
    im = noise_image(50, 40)
    tf = build_image_transform(16, (0.0,) * 3, (1.0,) * 3)
    out = tf(im)
    assert torch.equal(out, tf(im))
    # Independent reference: PIL bicubic resize of the shorter side to 16 (50x40 -> 20x16), crop x 2..18.
    ref = np.asarray(im.resize((20, 16), Image.Resampling.BICUBIC).crop((2, 0, 18, 16)), dtype=np.float32)
    torch.testing.assert_close(out, torch.from_numpy(ref / 255).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_train_transform_is_random_and_flips_only_when_asked():
    im = noise_image(40, 40)
    tf = build_image_transform(16, (0.0,) * 3, (1.0,) * 3, train=True)
    crops = [tf(im) for _ in range(4)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])

    halves = Image.new("RGB", (40, 40), (255, 0, 0))  # left red, right blue
    halves.paste((0, 0, 255), (20, 0, 40, 40))

    def left_is_red(tf):
        return tf(halves)[0, 8, 0].item() > 0.5

    no_flip = build_image_transform(16, (0.0,) * 3, (1.0,) * 3, train=True, scale=(0.9, 1.0))
    with_flip = build_image_transform(16, (0.0,) * 3, (1.0,) * 3, train=True, scale=(0.9, 1.0), hflip=True)
    assert all(left_is_red(no_flip) for _ in range(20))
    assert not all(left_is_red(with_flip) for _ in range(20))


def test_load_transform_encode(tmp_path):
    path = tmp_path / "x.png"
    noise_image(48, 36).convert("RGBA").save(path)
    enc = build_encoder("siglip", TINY).eval()
    tf = build_image_transform(enc.image_size, enc.image_mean, enc.image_std)
    batch = torch.stack([tf(load_image(path)), tf(load_image(path))])  # (2, 3, 32, 32)
    with torch.no_grad():
        out = enc(batch)
    assert out.patch_tokens.shape == (2, PATCHES, 32)
    torch.testing.assert_close(out.pooled[0], out.pooled[1])


@pytest.mark.parametrize("stem", ["conv", "cnn"])
def test_conv_stem_keeps_the_token_grid_and_round_trips(tmp_path, stem):
    from encoders.stem import ConvStem

    extra = 1 if stem == "cnn" else 0
    enc = build_encoder("vit", {**TINY}, stem=stem, stem_width=8, stem_extra=extra)
    assert isinstance(enc.model.embeddings.patch_embeddings.projection, ConvStem)
    plain = build_encoder("vit", {**TINY})
    px = torch.randn(2, 3, TINY["image_size"], TINY["image_size"])
    assert enc(px).patch_tokens.shape == plain(px).patch_tokens.shape
    cfg = json.loads(json.dumps(enc.config_dict()))
    assert cfg["stem"] == stem and cfg["stem_width"] == 8 and cfg["stem_extra"] == extra
    convs = [m for m in enc.model.embeddings.patch_embeddings.projection.layers if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].stride == ((1, 1) if stem == "cnn" else (2, 2))
    assert convs[0].out_channels == 8
    assert len(convs) == (3 if stem == "conv" else 4 + extra)  # TINY: patch 8
    assert convs[-1].stride == ((1, 1) if extra else (2, 2))
    again = build_encoder(**cfg)
    again.load_state_dict(enc.state_dict())
    assert torch.equal(again(px).patch_tokens, enc(px).patch_tokens)
    with pytest.raises(ValueError, match="stem"):
        build_encoder("clip", {**TINY}, stem="conv")


def test_sincos_position_init_codes_column_and_row():
    enc = build_encoder("vit", {**TINY}, position_init="sincos")
    pos = enc.model.embeddings.position_embeddings[0].detach()  # (1 + g*g, D)
    g, d = round((pos.shape[0] - 1) ** 0.5), pos.shape[1]
    assert torch.equal(pos[0], torch.zeros(d)), "CLS gets no position"
    grid = pos[1:].view(g, g, d)  # (row, col, D)
    assert abs(grid.std().item() - 0.02) < 1e-3
    x_half, y_half = grid[..., : d // 2], grid[..., d // 2 :]
    assert torch.allclose(x_half[0], x_half[-1]) and not torch.allclose(x_half[:, 0], x_half[:, -1])  # x: column
    assert torch.allclose(y_half[:, 0], y_half[:, -1]) and not torch.allclose(y_half[0], y_half[-1])  # y: row
    # first frequency: sin(column) scaled, the hand-computed value for column 1
    from encoders.stem import sincos_2d

    scale = 0.02 / sincos_2d(g, d).std()
    assert abs(grid[0, 1, 0].item() - math.sin(1.0) * scale.item()) < 1e-6
    assert enc.model.embeddings.position_embeddings.requires_grad, "still trained"
    with pytest.raises(ValueError, match="position_init"):
        build_encoder("vit", {**TINY}, position_init="rope")


def test_mean_pool_option_pools_patch_tokens_without_cls():
    enc = build_encoder("vit", {**TINY}, pool="mean").eval()
    px = torch.randn(2, 3, TINY["image_size"], TINY["image_size"])
    with torch.no_grad():
        out = enc(px)
        fast = vit.infer(enc, px)
    torch.testing.assert_close(out.pooled, out.patch_tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(fast.pooled, out.pooled, rtol=1e-4, atol=1e-5)
    cfg = json.loads(json.dumps(enc.config_dict()))
    assert cfg["pool"] == "mean" and build_encoder(**cfg).pool == "mean"
    assert "pool" not in build_encoder("vit", {**TINY}).config_dict()
    with pytest.raises(ValueError, match="pool"):
        build_encoder("vit", {**TINY}, pool="max")


def test_stem_norm_normalises_each_token_and_round_trips():
    from encoders.stem import ConvStem

    enc = build_encoder("vit", {**TINY}, stem="cnn", stem_width=8, stem_norm=True).eval()
    stem = enc.model.embeddings.patch_embeddings.projection
    assert isinstance(stem, ConvStem) and stem.norm is not None
    px = torch.randn(2, 3, TINY["image_size"], TINY["image_size"]) * 7
    with torch.no_grad():
        raw = stem.layers(px)  # (B, D, g, g) before the norm
        out = stem(px)
        fast = vit.infer(enc, px).patch_tokens
    want = (raw - raw.mean(1, keepdim=True)) / torch.sqrt(raw.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)  # per token over channels, at the LN's init
    torch.testing.assert_close(fast, enc(px).patch_tokens, rtol=1e-4, atol=1e-4)  # fused inference path too
    cfg = json.loads(json.dumps(enc.config_dict()))
    assert cfg["stem_norm"] is True
    again = build_encoder(**cfg)
    again.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(px).patch_tokens, enc(px).patch_tokens)
    assert "stem_norm" not in build_encoder("vit", {**TINY}, stem="cnn").config_dict()
    with pytest.raises(ValueError, match="stem_norm"):
        build_encoder("vit", {**TINY}, stem_norm=True)


def test_stem_init_kaiming_keeps_the_signal_scale_and_round_trips():
    from encoders.stem import ConvStem

    torch.manual_seed(0)
    he = ConvStem(64, 8, width=32, kind="cnn", init="kaiming")
    plain = ConvStem(64, 8, width=32, kind="cnn")
    for conv in (m for m in he.layers if isinstance(m, torch.nn.Conv2d)):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / math.sqrt(2 / fan_in) - 1) < 0.1, conv
        assert torch.count_nonzero(conv.bias) == 0
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert 0.3 < he(x).std().item() < 3.0  # He init: about the input's scale after four conv + GELU
        assert plain(x).std().item() < 0.1  # PyTorch's default: the signal shrinks ~3x per layer
    enc = build_encoder("vit", {**TINY}, stem="cnn", stem_width=8, stem_init="kaiming")
    cfg = json.loads(json.dumps(enc.config_dict()))
    assert cfg["stem_init"] == "kaiming" and build_encoder(**cfg).stem_init == "kaiming"
    with pytest.raises(ValueError, match="stem init"):
        ConvStem(64, 8, init="xavier")
