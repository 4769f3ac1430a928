"""`mmgpt explain` and `mmgpt.explain`: attention maps checked against softmax(q k^T / sqrt(d)) computed by
hand from the cross-attention weights, the picture's size against the panel layout, and the errors."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images

from mmgpt import MMGPTModel, MMGPTProcessor, build_model
from mmgpt.explain import (
    MAX_COLS,
    ExplainError,
    cross_attention_weights,
    explain,
    render_explanation,
    sheet_size,
)

TEXTS = ["a large red circle", "a small blue square and a large green triangle", "question: what? answer: red"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return trained_tiny_dir()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("explain") / "red-circle.png"
    world_images()[0].save(path)
    return str(path)


def random_model(**overrides):
    """The tiny preset with random weights; `overrides` are MMGPTConfig fields."""
    from mmgpt.config import MMGPTConfig

    torch.manual_seed(0)
    model, proc = build_model(MMGPTConfig.from_preset("tiny", **overrides), texts=TEXTS)
    return model.eval(), proc


def run_explain(capsys, *argv) -> tuple[int, str, str]:
    """Through `mmgpt.cli.main` once `explain` is in its COMMANDS table, else the module the same way."""
    from mmgpt import cli

    capsys.readouterr()  # drop what came before (e.g. save_pretrained's progress bar)
    argv = [str(a) for a in argv]
    if "explain" in cli.COMMANDS:
        rc = cli.main(["explain", *argv])
    else:
        from mmgpt.commands import explain as command

        parser = argparse.ArgumentParser(prog="mmgpt explain")
        command.add_arguments(parser)
        args = parser.parse_args(argv)
        args.command = "explain"
        try:
            rc = int(command.run(args) or 0)
        except cli.UserError as err:
            print(f"mmgpt explain: error: {err}", file=sys.stderr)
            rc = 2
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected_size(n_tokens: int, panel: int) -> tuple[int, int]:
    # One panel for the image and the whole text, then one per token; at most MAX_COLS to a row; each
    # panel is panel x panel with a label band of panel // 3 below.
    n = n_tokens + 1
    cols = min(n, MAX_COLS)
    rows = math.ceil(n / cols)
    return cols * panel, rows * (panel + panel // 3)


# --- the command -----------------------------------------------------------------------------------


def test_explain_cli_writes_a_png_of_the_expected_size(capsys, model_dir, image_file, tmp_path):
    model = MMGPTModel.from_pretrained(model_dir).eval()
    proc = MMGPTProcessor.from_pretrained(model_dir)
    ids = model.generate(pixel_values=proc.images([image_file]), max_new_tokens=24)[0, 1:].tolist()
    n_tokens = ids.index(proc.eos_id) if proc.eos_id in ids else len(ids)

    out = tmp_path / "sub" / "explain.png"
    rc, stdout, stderr = run_explain(capsys, model_dir, image_file, "--out", out, "--panel", 96, "--device", "cpu")
    assert rc == 0, stderr
    assert stdout.strip() == CAPTIONS[0]
    assert n_tokens == len(proc.tokenizer.encode(CAPTIONS[0]))
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == expected_size(n_tokens, 96)


def test_explain_cli_question_explains_the_answer(capsys, model_dir, image_file, tmp_path):
    out = tmp_path / "answer.png"
    rc, stdout, stderr = run_explain(capsys, model_dir, image_file, "--question", QUESTION, "--out", out,
                                     "--panel", 64, "--device", "cpu")
    assert rc == 0, stderr
    assert stdout.strip() == ANSWERS[0]
    with Image.open(out) as im:
        assert im.size == expected_size(1, 64)  # " red" is one token


def test_explain_cli_bad_image_is_one_line_and_exit_1(capsys, model_dir, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rc, stdout, stderr = run_explain(capsys, model_dir, bad, "--out", tmp_path / "x.png")
    assert rc == 1
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(str(bad))
    assert not (tmp_path / "x.png").exists()


def test_explain_cli_bad_model_folder_is_one_line_and_exit_2(capsys, image_file, tmp_path):
    rc, stdout, stderr = run_explain(capsys, tmp_path / "no-such-model", image_file, "--out", tmp_path / "x.png")
    assert rc == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "no-such-model" in stderr
    (tmp_path / "empty").mkdir()
    rc, _, stderr = run_explain(capsys, tmp_path / "empty", image_file, "--out", tmp_path / "x.png")
    assert rc == 2 and "not an mmgpt model folder" in stderr and len(stderr.strip().splitlines()) == 1


def test_explain_cli_resampler_model_says_maps_are_not_available(capsys, image_file, tmp_path):
    model, proc = random_model(adapter={"type": "resampler", "num_queries": 8})
    folder = tmp_path / "resampler"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    rc, stdout, stderr = run_explain(capsys, folder, image_file, "--out", tmp_path / "r.png", "--device", "cpu")
    assert rc == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "resampler" in stderr and "per-patch attention maps are not available" in stderr
    assert not (tmp_path / "r.png").exists()


def test_explain_cli_refuses_bad_options(capsys, model_dir, image_file, tmp_path):
    for extra in (["--max-new-tokens", "0"], ["--question", "  "], ["--panel", "8"], ["--out", tmp_path / "x.xyz"]):
        rc, _, stderr = run_explain(capsys, model_dir, image_file, "--out", tmp_path / "x.png", *extra)
        assert rc == 2 and len(stderr.strip().splitlines()) == 1, (extra, stderr)


# --- the maps --------------------------------------------------------------------------------------


def hand_cross_attention(block, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head from the module's weights; x (B, T, D) is the cross-attention's
    input (after ln_cross_attn), memory (B, K, D). -> (B, H, T, K)."""
    att = block.crossattention
    h, d = att.num_heads, att.head_dim
    q = x @ att.q_attn.weight + att.q_attn.bias  # (B, T, D): transformers' Conv1D is x @ W + b
    k = (memory @ att.c_attn.weight + att.c_attn.bias)[..., : h * d]  # (B, K, D): keys, then values
    q = q.view(*q.shape[:2], h, d).transpose(1, 2)  # (B, H, T, d)
    k = k.view(*k.shape[:2], h, d).transpose(1, 2)  # (B, H, K, d)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, H, T, K)


@pytest.mark.parametrize("overrides", [{}, {"unimodal_layers": 1, "adapter": {"type": "linear"}}],
                         ids=["mlp", "linear-coca"])
def test_maps_are_the_hand_computed_attention_rows_without_cls(overrides):
    model, proc = random_model(**overrides)
    with torch.no_grad():  # a zero EOS row (tied to lm_head): its logit 0 never wins, so 6 tokens come out
        model.decoder.transformer.wte.weight[proc.eos_id] = 0
    image = world_images()[1]
    text, tokens, maps = explain(model, proc, image, max_new_tokens=6)
    n = len(tokens)
    assert n == 6
    assert model.decoder.config._attn_implementation == "sdpa"  # switched back after the eager pass

    # The same ids and memory through the model in its usual (SDPA) mode, capturing what each
    # cross-attention receives; then the attention by hand from its weights.
    ids = model.generate(pixel_values=proc.images([image]), max_new_tokens=6)[:, : 1 + n]  # (1, 1 + n)
    memory = model.encode_image(proc.images([image])).tokens  # (1, 65, D): [CLS] + 8 x 8 patches
    inputs = {}
    blocks = list(model.decoder.transformer.h)[model.k :]
    hooks = [
        blk.crossattention.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: inputs.__setitem__(i, (args[0], kwargs["encoder_hidden_states"])),
            with_kwargs=True,
        )
        for i, blk in enumerate(blocks)
    ]
    with torch.no_grad():
        model(input_ids=ids, pixel_values=proc.images([image]))
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        hand = torch.stack([hand_cross_attention(blk, *inputs[i]) for i, blk in enumerate(blocks)])  # (L, 1, H, T, K)

    weights, logits = cross_attention_weights(model, ids, torch.ones_like(ids), memory)
    assert weights.shape == (len(blocks), 1, model.decoder.config.n_head, 1 + n, memory.shape[1])
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights, hand, atol=1e-5, rtol=1e-4)
    # The teacher-forced pass predicts exactly the generated tokens: row t is the step that chose token t+1.
    assert logits[0, :n].argmax(-1).tolist() == ids[0, 1:].tolist()

    rows = hand.mean(dim=(0, 2))[0, :n]  # (n, K): averaged over layers and heads
    assert maps.shape == (n, 8, 8)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps, rows[:, 1:].reshape(n, 8, 8), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.sum((1, 2)), 1 - rows[:, 0], atol=1e-5, rtol=1e-4)  # all but [CLS]
    assert text == proc.decode(ids[0, 1:])
    assert "".join(tokens).strip() == text


def test_resampler_model_raises_a_clear_error():
    model, proc = random_model(adapter={"type": "resampler", "num_queries": 8})
    with pytest.raises(ExplainError, match="per-patch attention maps are not available"):
        explain(model, proc, world_images()[0])


def test_prefix_fusion_model_raises_a_clear_error():
    from mmgpt.config import FUSIONS, MMGPTConfig, list_presets

    if "prefix" not in FUSIONS or "tiny-prefix" not in list_presets():
        pytest.skip("this tree has no prefix fusion")
    torch.manual_seed(0)
    model, proc = build_model(MMGPTConfig.from_preset("tiny-prefix"), texts=TEXTS)
    with pytest.raises(ExplainError, match="no cross-attention"):
        explain(model, proc, world_images()[0])


# --- the picture -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [0, 1, 5, 6, 13])
def test_render_explanation_size_follows_the_panel_layout(n_tokens):
    image = Image.new("RGB", (80, 50), (200, 220, 240))  # not square: centre-cropped like the model's input
    rng = np.random.default_rng(0)
    maps = rng.random((n_tokens, 8, 8)).astype(np.float32)
    tokens = [f" w{i}" for i in range(n_tokens)]
    sheet = render_explanation(image, " ".join(tokens), tokens, maps, panel=48)
    assert sheet.size == expected_size(n_tokens, 48) == sheet_size(n_tokens, 48)
    assert sheet.mode == "RGB"


def test_render_explanation_puts_the_heat_where_the_map_is():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    heat = np.zeros((1, 8, 8), dtype=np.float32)
    heat[0, 0, 7] = 1.0  # top-right patch
    sheet = np.asarray(render_explanation(image, "x", ["x"], heat, panel=64)).astype(int)
    panel = sheet[:64, 64:128]  # the token's panel, right of the image panel
    top_right, bottom_left = panel[6, 58], panel[58, 6]
    assert top_right[0] > top_right[2]  # red end of the ramp
    assert bottom_left[2] > bottom_left[0]  # blue end
