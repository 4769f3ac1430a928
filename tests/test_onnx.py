"""ONNX export (mmgpt.onnx_export) on a tiny trained model: onnxruntime's logits within 1e-4 of PyTorch's,
and the same greedy captions and answers as mmgpt's own API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_api import ANSWERS, CAPTIONS, QUESTION, trained_tiny_dir, world_images

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mmgpt.api import load
from mmgpt.cli import main
from mmgpt.onnx_export import MERGED_FILE, ONNX_FILES, cache_names, parity
from mmgpt.onnx_runner import OnnxVisionLanguage

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", str(trained_tiny_dir()), "--format", "onnx", "--out", str(out), "--no-check"]) == 0
    return out


@pytest.fixture(scope="module")
def vl():
    return load(trained_tiny_dir(), device="cpu")


def test_layout_and_names(exported, vl):
    import onnx

    for name in (*ONNX_FILES, MERGED_FILE):
        onnx.checker.check_model(str(exported / "onnx" / name))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "mmgpt_processor.json"):
        assert (exported / name).is_file(), name
    ox = OnnxVisionLanguage(exported, merged=False)
    assert [i.name for i in ox.encoder.get_inputs()] == ["pixel_values"]
    assert [o.name for o in ox.encoder.get_outputs()] == ["last_hidden_state"]
    past = cache_names(vl.model, "past_key_values")
    assert "past_key_values.0.decoder.key" in past and "past_key_values.1.encoder.value" in past
    assert [i.name for i in ox.decoder_with_past.get_inputs()] == ["input_ids", "attention_mask", *past]
    assert [o.name for o in ox.decoder.get_outputs()] == ["logits", *cache_names(vl.model, "present")]
    merged = OnnxVisionLanguage(exported).decoder  # what transformers.js loads
    assert [i.name for i in merged.get_inputs()] == ["input_ids", "attention_mask", "encoder_hidden_states", *past,
                                                      "use_cache_branch"]
    assert [o.name for o in merged.get_outputs()] == ["logits", *cache_names(vl.model, "present")]


def test_logits_match_pytorch(exported, vl):
    assert parity(vl.model, vl.processor, exported, rows=3) < 1e-4


@pytest.mark.parametrize("merged", [True, False])
def test_logits_match_pytorch_by_hand(exported, vl, merged):
    """A second check written without parity(): a longer cached run against the uncached forward."""
    ox = OnnxVisionLanguage(exported, merged=merged)
    proc, model = vl.processor, vl.model
    px = proc.images(world_images()[:2])
    batch = proc.batch_prompts(["vqa", "caption"], [QUESTION, ""])
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    memory = ox.encode(px.numpy())
    logits, cache = ox.first_step(ids, mask, memory)
    steps = [logits[:, -1]]
    for tok in ([5, 6], [7, 8], [9, 10]):
        ids = np.concatenate([ids, np.array(tok)[:, None]], 1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        logits, cache = ox.next_step(ids[:, -1:], mask, cache)
        steps.append(logits[:, -1])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=px).logits
    ref_steps = ref[:, -4:].numpy()  # the prompt's last position, then the three fed tokens
    assert np.abs(np.stack(steps, 1) - ref_steps).max() < 1e-4


@pytest.mark.parametrize("merged", [True, False])
def test_greedy_captions_and_answers_equal_mmgpt(exported, vl, merged):
    ox = OnnxVisionLanguage(exported, threads=1, merged=merged)
    ims = world_images()
    assert ox.caption(ims) == vl.caption(ims) == CAPTIONS
    assert ox.ask(ims, QUESTION) == vl.ask(ims, QUESTION) == ANSWERS
    assert ox.caption(ims[0]) == CAPTIONS[0]


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="mmgpt export"):
        OnnxVisionLanguage(tmp_path)


def test_image_slot_codes_are_in_the_exported_memory(tmp_path):
    """A model that reads several images per conversation (config.max_images > 1) adds a learned code to
    each image's tokens: the export (one image per row) carries the first slot's, as generate() does."""
    from mmgpt import MMGPTConfig, build_model
    from mmgpt.onnx_export import export_onnx

    torch.manual_seed(0)
    model, proc = build_model(MMGPTConfig.from_preset("tiny", max_images=2), texts=["a red circle", "a blue square"])
    with torch.no_grad():
        model.image_code.normal_(0, 1.0)  # large codes: leaving them out would move the logits far past 1e-4
    model.eval()
    export_onnx(model, proc, tmp_path)
    ox = OnnxVisionLanguage(tmp_path)
    px = proc.images(world_images()[:2])
    batch = proc.batch_prompts(["vqa", "caption"], [QUESTION, ""])
    logits, _ = ox.first_step(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), ox.encode(px.numpy()))
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=px).logits
        gen = model.generate(pixel_values=px, **batch, max_new_tokens=5, min_new_tokens=5)
    real = batch["attention_mask"].bool().numpy()
    assert np.abs(logits - ref.numpy())[real].max() < 1e-4
    out = ox.generate(px.numpy(), batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=5,
                      eos_token_id=-1)
    assert out.tolist() == gen.tolist()


def test_prefix_fusion_is_refused_in_one_line(tmp_path, capsys):
    from mmgpt import build_model

    model, proc = build_model("tiny-prefix", texts=["a red circle"])
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mmgpt export")]  # (and load bars)
    assert len(err) == 1 and "fusion='prefix'" in err[0] and "cross-attention" in err[0]
    assert not (tmp_path / "o").exists()


def test_exporting_leaves_the_model_in_eval_mode(tmp_path, vl):
    """torch.onnx.export puts back the training mode it found on each graph wrapper; a wrapper starts in
    training mode, so the exported model was left training (dropout on, the fast decoding path off)."""
    from mmgpt.onnx_export import export_onnx

    model = vl.model.eval()
    export_onnx(model, vl.processor, tmp_path / "out")
    assert not any(m.training for m in model.modules())
    assert model._can_use_fast_path({"max_new_tokens": 4})
