"""GPU paths against CPU / fp32 / eager references. Skipped where no CUDA GPU is present (CI); run on a
GPU machine with `python -m pytest tests/test_gpu.py`.

What the CPU suite cannot see: the same weights giving the same numbers on the GPU, bf16 / fp16
training through Accelerate's autocast, SDPA kernels against eager attention, the fast greedy loop on
CUDA, the pipeline in bf16, and the feature cache living on the GPU."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# MMGPT_TEST_DEVICE=cpu runs these checks on the CPU (to check the tests themselves).
DEV = os.environ.get("MMGPT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a red circle above a blue square", "what shape is it? circle", "how many? two",
         "a green triangle", "what color is the square? blue"]
SMALL = [
    "data.train=[{format: shapes, split: train, size: 64, task_mix: {caption: 1, vqa: 2}}]",
    "data.num_workers=0", "batch_size=8", "log_every=1", "progress=false", "optim.warmup_steps=2",
    "model.tokenizer_texts=400", "time_schedule=false", "max_minutes=null",
]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: fp32 comparisons against the CPU mean fp32 on both sides."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model(attn="sdpa", seed=0):
    from mmgpt import build_model

    torch.manual_seed(seed)
    model, proc = build_model("tiny", texts=TEXTS, attn_implementation=attn)
    return model, proc


def _batch(proc, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = proc.batch_examples(["caption", "vqa", "caption", "vqa"][:n],
                                [None, "what shape is it?", None, "how many?"][:n],
                                ["a red circle above a blue square", "circle", "a green triangle", "two"][:n])
    batch["pixel_values"] = torch.randn(n, 3, proc.image_size, proc.image_size, generator=g)
    return batch


def _to(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_same_weights_give_the_cpu_loss_and_gradients_on_the_gpu():
    model, proc = _model()
    model.train()
    batch = _batch(proc)
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.to(DEV)
    out = model(**_to(batch, DEV))
    out.loss.backward()
    assert torch.allclose(out.loss.cpu(), ref.loss, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.itc_loss.cpu(), ref.itc_loss, rtol=1e-4, atol=1e-5)
    for k, p in model.named_parameters():
        if k in ref_grads:
            assert torch.allclose(p.grad.cpu(), ref_grads[k], rtol=1e-3, atol=1e-5), k


def test_bf16_autocast_loss_is_close_to_fp32_and_gradients_are_finite():
    model, proc = _model()
    model.train().to(DEV)
    batch = _to(_batch(proc), DEV)
    ref = model(**batch).loss.item()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32  # losses computed in fp32 under autocast
    assert abs(out.loss.item() - ref) / ref < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_kernels_match_eager_attention(dtype):
    sdpa, proc = _model("sdpa")
    eager, _ = _model("eager")
    eager.load_state_dict(sdpa.state_dict())
    batch = _to(_batch(proc), DEV)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    outs = []
    for m in (sdpa, eager):
        m.eval().to(DEV, dtype)
        with torch.no_grad():
            outs.append(m(**batch))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    keep = batch["attention_mask"].bool()  # padding positions' logits are never read
    assert torch.allclose(outs[0].logits[keep].float(), outs[1].logits[keep].float(), atol=tol * 10, rtol=tol)
    assert abs(outs[0].loss.item() - outs[1].loss.item()) < tol * 10


def test_fast_greedy_loop_on_cuda_gives_the_tokens_of_the_cpu_and_of_no_cache():
    model, proc = _model()
    model.eval()
    px = torch.randn(3, 3, proc.image_size, proc.image_size, generator=torch.Generator().manual_seed(3))
    q = proc(text=["what shape is it?", "how many?", "what color?"])
    kw = dict(max_new_tokens=8, do_sample=False)
    cpu = model.generate(pixel_values=px, **kw)
    cpu_q = model.generate(pixel_values=px, input_ids=q["input_ids"], attention_mask=q["attention_mask"], **kw)
    model.to(DEV)
    gpu = model.generate(pixel_values=px.to(DEV), **kw)
    slow = model.generate(pixel_values=px.to(DEV), fast=False, use_cache=False, **kw)
    gpu_q = model.generate(pixel_values=px.to(DEV), input_ids=q["input_ids"].to(DEV),
                           attention_mask=q["attention_mask"].to(DEV), **kw)
    assert torch.equal(gpu.cpu(), cpu) and torch.equal(slow.cpu(), cpu)
    assert torch.equal(gpu_q.cpu(), cpu_q)
    beams = model.generate(pixel_values=px.to(DEV), num_beams=3, max_new_tokens=6)
    assert beams.shape[0] == 3
    model.to(torch.bfloat16)
    half = model.generate(pixel_values=px.to(DEV).bfloat16(), **kw)
    assert half.shape == gpu.shape and half.dtype == torch.long


def _train(out, *extra):
    from train.main import main

    return main([str(ROOT / "configs/train/shapes-tiny.yaml"), *SMALL, f"output_dir={out}", *extra])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_with_mixed_precision_on_the_gpu_learns_saves_fp32_and_resumes(tmp_path, precision):
    out = tmp_path / "run"
    common = [f"precision={precision}", "checkpoint_every=4", "data.validation=shapes:validation:16"]
    assert _train(out, "max_steps=8", *common) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert any("eval" in json.dumps(r) or "vqa" in json.dumps(r) for r in logs if "loss" not in r)
    weights = load_file(out / "model" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert _train(out, "max_steps=10", "resume=latest", *common) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 11))


def test_frozen_encoder_feature_cache_on_the_gpu_gives_the_same_training(tmp_path):
    common = ["max_steps=6", "precision=no", "deterministic=true", "freeze.vision=true", "data.validation=null",
              "data.train=[{format: shapes, split: train, size: 8, task_mix: {caption: 1, vqa: 1}}]"]
    assert _train(tmp_path / "a", *common, "freeze.feature_cache=none") == 0
    assert _train(tmp_path / "b", *common) == 0
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_pipeline_on_cuda_answers_as_on_the_cpu_and_runs_in_bf16(tmp_path):
    from PIL import Image

    import mmgpt

    model, proc = _model()
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    cpu = mmgpt.load(tmp_path / "m", device="cpu")
    gpu = mmgpt.load(tmp_path / "m", device=DEV)
    assert gpu.device.type == DEV
    assert gpu.caption(images, max_new_tokens=6) == cpu.caption(images, max_new_tokens=6)
    assert gpu.ask(images, ["what shape is it?"] * 2, max_new_tokens=4) == \
        cpu.ask(images, ["what shape is it?"] * 2, max_new_tokens=4)
    sim_cpu, sim_gpu = cpu.similarity(images, TEXTS[:3]), gpu.similarity(images, TEXTS[:3])
    assert torch.allclose(sim_gpu.cpu().float(), sim_cpu, atol=1e-3)
    half = mmgpt.load(tmp_path / "m", device=DEV, dtype="bf16")
    assert half.dtype == torch.bfloat16
    assert len(half.caption(images, max_new_tokens=6)) == 2
    assert torch.allclose(half.similarity(images, TEXTS[:3]).cpu().float(), sim_cpu, atol=5e-2)
