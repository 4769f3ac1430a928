"""Resuming a run, and what a checkpoint of it holds.

`find_resume_point` picks the checkpoint (resume=latest or a folder) before anything is built, and keeps a
fresh run from mixing with an earlier run's checkpoints. `resume_run` loads it into the prepared `Run`
(each way it can fail to fit is one line), sets aside the checkpoints after it and cuts the log back to
it. `save_run_checkpoint` writes the state that `resume_run` reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    previous_checkpoint,
    save_checkpoint,
    unreadable_file,
    unreadable_random_states,
)
from train.config import ConfigError, TrainConfig
from train.data.bad import BadDataCounter
from train.run_setup import Run, TrainingError, first_line


def find_resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from (None: a fresh start); a fresh run into a folder that holds an
    earlier run's checkpoints is refused."""
    out = Path(cfg.output_dir)
    resume_from = _resume_point(cfg, out / "checkpoints")
    _check_output_dir(cfg, out, resume_from)
    return resume_from


def resume_run(run: Run) -> None:
    """Load `run.resume_from` (when there is one) into the prepared model, optimizer, scheduler, data
    position and random states, and restore the progress counters from its trainer_state.json."""
    resume_from, cfg, main = run.resume_from, run.cfg, run.main
    state = run.state
    if resume_from is not None:
        saved = _read_trainer_state(cfg, resume_from)
        _load_state(run.accelerator, resume_from)
        if main and (why := unreadable_random_states(resume_from, run.accelerator.process_index)):
            print(f"warning: resume: {why} in {resume_from}: the run goes on with fresh random states, so its data "
                  "order and random augmentations differ from an uninterrupted run's", flush=True)
        if main:
            _set_aside_later_checkpoints(run.ckpt_dir, resume_from, saved["step"])
        if "seen_items" not in saved:  # written before the count was kept: its bad records can't be judged
            saved["bad"] = {}
        if saved.get("best_metric", cfg.best_metric) != cfg.best_metric:
            saved["best"] = None  # a best value of another metric says nothing about this one
        best_file = run.out / "best" / "best_metric.json"
        if saved.get("best") is None and cfg.best_metric and best_file.is_file():
            saved["best"] = json.loads(best_file.read_text()).get(cfg.best_metric)
        state.update(saved)
        if main:
            _drop_log_after(run.metrics_path, state["step"])  # steps after the checkpoint are trained again
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
    run.bad = BadDataCounter.from_dict(state["bad"]) if state["bad"] else BadDataCounter()
    run.seen_items, run.best = state["seen_items"], state["best"]


def save_run_checkpoint(run: Run, step: int) -> Path:
    """OUT/checkpoints/step-N: Accelerate's state and the trainer state that `resume_run` reads back."""
    cfg, state = run.cfg, run.state
    state["bad"], state["best"], state["seen_items"] = run.bad.to_dict(), run.best, run.seen_items
    state["best_metric"], state["batch_size"], state["lora"] = cfg.best_metric, cfg.batch_size, lora_shape(cfg)
    state["train_seconds"] = time.time() - run.t0
    return save_checkpoint(run.accelerator, run.ckpt_dir, step, state, keep=cfg.keep_checkpoints)


def lora_shape(cfg: TrainConfig) -> dict:
    """The LoRA settings that decide the model's parameters (dropout does not; off is off whatever r says)."""
    lo = cfg.lora
    return {"enabled": False} if not lo.enabled else {"enabled": True, "r": lo.r, "alpha": lo.alpha,
                                                       "target_modules": lo.target_modules}


def _read_trainer_state(cfg: TrainConfig, resume_from: Path) -> dict:
    """The checkpoint's trainer_state.json, refused when the run's batch size or LoRA settings differ."""
    saved = json.loads((resume_from / "trainer_state.json").read_text())
    if saved.get("batch_size", cfg.batch_size) != cfg.batch_size:  # the data position counts batches
        raise ConfigError(f"resume: the checkpoint was trained with batch_size={saved['batch_size']}; "
                          f"resume with that batch_size (this run says {cfg.batch_size})")
    lora_now = lora_shape(cfg)
    lora_then = saved.get("lora", lora_now)
    if lora_then != lora_now:  # the model's parameters differ: lora_* layers, their rank or places
        diff = ", ".join(f"lora.{k}={lora_then.get(k)!r}" for k in lora_now if lora_then.get(k) != lora_now[k])
        raise ConfigError(f"resume: the checkpoint was trained with {diff}; resume with the LoRA settings it was "
                          "trained with")
    return saved


def _load_state(accelerator, resume_from: Path) -> None:
    """`accelerator.load_state`, its failures told apart: a run that does not fit (ConfigError) or a
    damaged checkpoint (TrainingError naming the file and the checkpoint to use instead)."""
    try:
        accelerator.load_state(str(resume_from))
    except ValueError as err:  # torch: "loaded state dict has a different number of parameter groups"
        raise ConfigError(f"resume: the checkpoint's optimizer does not fit this run ({err}); resume with the "
                          "optim.name, freeze.* and per-part learning rates it was trained with") from None
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):  # a corrupt file, memory: not a config matter
            _corrupt_checkpoint(resume_from, err)
        raise ConfigError(f"resume: the checkpoint's weights do not fit this run's model ({first_line(err)}); resume with "
                          "the model, lora.* and freeze.* settings it was trained with") from None
    except Exception as err:  # noqa: BLE001 - a truncated or damaged file (safetensors, pickle, zip errors)
        _corrupt_checkpoint(resume_from, err)


def _resume_point(cfg: TrainConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to continue from: resume=latest (None when there is none yet: a fresh start) or a
    checkpoint folder, which must hold one."""
    if cfg.resume == "latest":
        return latest_checkpoint(ckpt_dir)
    if not cfg.resume:
        return None
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume: {str(path)!r} is not a checkpoint folder (no trainer_state.json); give "
                          f"resume=latest or a folder such as {ckpt_dir / 'step-100'}")
    return path


def _check_output_dir(cfg: TrainConfig, out: Path, resume_from: Path | None) -> None:
    """A fresh run must not mix with an earlier run's checkpoints: keeping the newest ones would delete its
    own as soon as they are written, and resume=latest would then pick the other run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {str(out)!r} is a file; give a folder")
    if resume_from is None and not cfg.overwrite:
        earlier = [p for p in list_checkpoints(out / "checkpoints") if (p / "trainer_state.json").is_file()]
        if earlier:
            raise ConfigError(
                f"output_dir {str(out)!r} holds checkpoints of an earlier run (up to {earlier[-1].name}): "
                "continue it with resume=latest, start over with overwrite=true (deletes them), or give "
                "another output_dir")


def _set_aside_later_checkpoints(ckpt_dir: Path, resume_from: Path, step: int) -> None:
    """Resuming from step N abandons the checkpoints after N: renamed `abandoned-step-M`, so that pruning
    (which keeps the highest steps) cannot delete this run's new ones and resume=latest cannot pick them."""
    for p in list_checkpoints(ckpt_dir):
        m = int(p.name.split("-")[1])
        if m > step and p.resolve() != resume_from.resolve():
            target = p.with_name(f"abandoned-{p.name}")
            if target.exists():
                shutil.rmtree(target)
            os.replace(p, target)
            print(f"resuming from step {step}: the later {p.name} is set aside as {target.name}", flush=True)


def _drop_log_after(path: Path, step: int) -> None:
    """Forget the log lines of steps after `step` (they are trained again); a torn last line goes too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except ValueError:
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _corrupt_checkpoint(ckpt: Path, err: BaseException):
    """A checkpoint that does not load: TrainingError naming its unreadable file and the checkpoint
    before it, to resume from instead."""
    found = unreadable_file(ckpt)
    what = f"{found[0]} is unreadable ({found[1]})" if found else f"it does not load ({first_line(err)})"
    prev = previous_checkpoint(ckpt)
    then = (f"resume from the previous complete checkpoint with resume={prev}" if prev else
            "there is no earlier complete checkpoint: start over with overwrite=true")
    raise TrainingError(f"resume: checkpoint {ckpt}: {what}; {then}") from None
