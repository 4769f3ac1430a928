"""The training loop's phases run alone (train/loop.py's map): one `train_step` against a hand-written
forward / ITC ramp / clipping / AdamW step on a copy of the model, and `find_resume_point` among
checkpoints made on the spot."""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train.collate import MODEL_KEYS
from train.config import ConfigError, load_config
from train.loop import train_step
from train.resume import find_resume_point
from train.run_setup import TrainingError, setup_run

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LR, WD, CLIP, WARM, BETAS, EPS = 1e-2, 0.5, 0.5, 4, (0.9, 0.98), 1e-8


def _cfg(tmp_path, *extra):
    return load_config(None, [
        "model.preset=tiny", "data.train=[{format: shapes, split: train, size: 16, task_mix: {caption: 1, vqa: 1}}]",
        "data.num_workers=0", "data.validation=null", "batch_size=4", "progress=false", "model.tokenizer_texts=100",
        "time_schedule=false", "max_minutes=null", "max_steps=8", f"output_dir={tmp_path / 'run'}",
        "optim.name=adamw", f"optim.lr={LR}", f"optim.weight_decay={WD}", f"optim.grad_clip={CLIP}",
        f"optim.warmup_steps={WARM}", f"optim.betas=[{BETAS[0]}, {BETAS[1]}]", f"optim.eps={EPS}",
        "objectives.itc_weight=0.5", *extra])


def test_one_train_step_matches_a_hand_written_step(tmp_path):
    run = setup_run(_cfg(tmp_path), None, None)
    batch = next(b for b in run.dl if "pixel_values" in b)
    ref = copy.deepcopy(run.unwrapped)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}

    loss, outputs = train_step(run, batch)

    out = ref(**{k: batch[k] for k in MODEL_KEYS if k in batch})
    assert out.itc_loss is not None and float(out.itc_loss.detach()) > 0
    expected = ref.config.lm_weight * out.lm_loss + 0.5 * out.itc_loss
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.itc_loss.detach(), out.itc_loss.detach(), rtol=1e-5, atol=1e-6)
    expected.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert norm > CLIP  # so that clipping acts
    assert float(run.grad_norm) == pytest.approx(norm, rel=1e-5)
    lr = LR * 1 / WARM  # warmup's first step
    changed = 0
    for name, p in run.unwrapped.named_parameters():
        want = before[name]
        if name in grads:  # AdamW's first step: m / (1 - b1) = g, sqrt(v / (1 - b2)) = |g|
            g = grads[name] * min(1.0, CLIP / (norm + 1e-6))
            decay = WD if p.ndim >= 2 and "wpe" not in name and "position" not in name else 0.0
            want = want * (1 - lr * decay) - lr * g / (g.abs() + EPS)
            changed += 1
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=2e-6, msg=name)
    assert changed > 10
    assert run.scheduler.get_last_lr()[0] == pytest.approx(LR * 2 / WARM)  # the scheduler stepped once
    assert not any(p.grad is not None for p in run.unwrapped.parameters())  # zeroed for the next step


def _fake_forward(loss: float, itc_loss: float | None = None):
    """A forward whose losses are given: train_step's own arithmetic, without a model."""
    leaf = torch.tensor(loss, requires_grad=True)
    return lambda **inputs: SimpleNamespace(loss=leaf * 1, itc_loss=None if itc_loss is None else torch.tensor(itc_loss))


def test_the_itc_ramp_and_non_finite_losses(tmp_path):
    run = setup_run(_cfg(tmp_path, "objectives.itc_warmup_steps=10"), None, None)
    batch = next(b for b in run.dl if "pixel_values" in b)
    run.train_forward = _fake_forward(3.0, itc_loss=2.0)  # model loss = lm + 0.5 * itc = 2 + 0.5 * 2
    assert float(train_step(run, batch)[0].detach()) == pytest.approx(2.0)  # step 0: none of the ITC yet
    run.state["step"] = 5
    assert float(train_step(run, batch)[0].detach()) == pytest.approx(2.5)  # half of it
    run.state["step"] = 10
    assert float(train_step(run, batch)[0].detach()) == pytest.approx(3.0)  # all of it

    before = [p.detach().clone() for p in run.unwrapped.parameters()]
    lr = run.scheduler.get_last_lr()[0]
    run.train_forward = _fake_forward(float("nan"))
    for _ in range(4):
        assert train_step(run, batch) is None
    assert run.state["nonfinite"] == 4 and run.consecutive_nonfinite == 4
    assert all(torch.equal(a, b) for a, b in zip(before, run.unwrapped.parameters()))
    assert run.scheduler.get_last_lr()[0] == lr  # no scheduler step either
    with pytest.raises(TrainingError, match="5 non-finite losses in a row at step 10"):
        train_step(run, batch)


def _checkpoint(ckpt_dir: Path, name: str, complete: bool = True) -> Path:
    folder = ckpt_dir / name
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"step": int(name.rsplit("-", 1)[1])}) + "\n")
    return folder


def test_the_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for name in ("step-2", "step-10", "step-9"):
        _checkpoint(ckpts, name)
    _checkpoint(ckpts, "step-12", complete=False)  # killed mid-write: no trainer_state.json
    _checkpoint(ckpts, ".tmp-step-14", complete=False)
    _checkpoint(ckpts, "abandoned-step-20")  # set aside by an earlier resume
    assert find_resume_point(_cfg(tmp_path, "resume=latest")) == ckpts / "step-10"
    assert find_resume_point(_cfg(tmp_path, f"resume={ckpts / 'step-2'}")) == ckpts / "step-2"
    with pytest.raises(ConfigError, match="step-12.* is not a checkpoint folder"):
        find_resume_point(_cfg(tmp_path, f"resume={ckpts / 'step-12'}"))
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(up to step-10\)"):
        find_resume_point(_cfg(tmp_path))  # a fresh run into that folder
    assert find_resume_point(_cfg(tmp_path, "overwrite=true")) is None
    assert find_resume_point(_cfg(tmp_path / "empty", "resume=latest")) is None  # nothing yet: a fresh start
