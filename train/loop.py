"""The training loop: one Accelerate loop from one CPU to many GPUs, with exact resume.

`run_training(cfg)` runs these phases in order, each on one `Run` (train/run_setup.py) that holds the
accelerator, model, optimizer, loaders and paths, and the progress the loop advances:

  find_resume_point  train/resume.py       the checkpoint to continue from (resume=latest or a folder);
                                           a fresh run refuses a folder of an earlier run's checkpoints
  setup_run          train/run_setup.py    accelerator, OUT, data loader, model (frozen parts, LoRA),
                                           optimizer and schedule, accelerator.prepare -> the `Run`
  resume_run         train/resume.py       load the checkpoint, set aside later ones, cut the log back
  _start_loop        here                  progress bar, feature cache, clock, SIGINT / SIGTERM handlers
  _train             here                  the epochs; each micro-batch is one `train_step` (forward,
                                           finite check, backward, clipping, optimizer and scheduler
                                           step); after each step `_log_step` writes the logged record
                                           and `_after_step` checks bad data, evaluates and keeps the
                                           best (`evaluate_and_keep_best`, train/run_outputs.py), writes
                                           checkpoints (`save_run_checkpoint`, train/resume.py), and
                                           stops on a signal or the time budget
  finish_run         train/run_outputs.py  final evaluation, OUT/model and its card, the run's summary
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch

from train.checkpoint import DiskFull, disk_full_message, is_disk_full
from train.collate import MODEL_KEYS
from train.config import TrainConfig
from train.data.bad import DataError
from train.parts import FeatureCache
from train.resume import find_resume_point, resume_run, save_run_checkpoint
from train.run_outputs import evaluate_and_keep_best, finish_run, log_record
from train.run_setup import Run, TrainingError, setup_run

_STEP_DELAY = float(os.environ.get("MMGPT_TEST_STEP_DELAY", "0") or 0)


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run after a checkpoint of its last finished step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}; continue with resume=latest" if checkpoint else "no checkpoint written"
        super().__init__(f"{name} at step {step}: {where}")


def run_training(cfg: TrainConfig, accelerator=None) -> dict:
    """Train per `cfg`; returns a summary dict. Writes OUT/metrics.jsonl, OUT/checkpoints, OUT/model.
    A full disk anywhere is one TrainingError line: "no space left on DEVICE at PATH: ..."."""
    try:
        return _run_training(cfg, accelerator)
    except DiskFull as err:  # a checkpoint or the model: the partial folder is already removed
        raise TrainingError(str(err)) from None
    except Exception as err:
        if not is_disk_full(err, Path(cfg.output_dir)):
            raise
        raise TrainingError(disk_full_message(err, Path(cfg.output_dir), "free some space, then continue with "
                                              "resume=latest")) from None


def _run_training(cfg: TrainConfig, accelerator=None) -> dict:
    resume_from = find_resume_point(cfg)
    run = setup_run(cfg, accelerator, resume_from)
    resume_run(run)
    _start_loop(run)
    try:
        _train(run)
    finally:
        if run.signals is not None:
            run.signals.restore()
    return finish_run(run)


def _start_loop(run: Run) -> None:
    """What only the loop needs: the progress bar, the feature cache, the clock, the stop signals."""
    cfg = run.cfg
    if cfg.save_on_each_node:  # transformers' save_pretrained writes on global rank 0 only: here on each machine's first
        run.unwrapped.should_save_on_this_rank = lambda is_main_process: is_main_process
    if not run.streamed and len(run.dl) == 0:
        raise TrainingError(f"the training data gives no full batch of {cfg.batch_size}: use a smaller batch_size")
    if run.main and cfg.progress:
        from tqdm.auto import tqdm

        # A time budget ends the run first when its steps would outlast it: the bar then counts steps
        # without a total (its ETA would be the step cap's) and the postfix shows the minutes left.
        run.bar = tqdm(total=None if cfg.max_minutes else cfg.max_steps, initial=run.state["step"], desc="train",
                       dynamic_ncols=True)
    if cfg.freeze.vision and not cfg.data.augment and cfg.freeze.feature_cache == "memory":
        run.cache = FeatureCache(cfg.freeze.feature_cache_gb * 2**30)
    run.timer["t0"] = time.time() - run.state["train_seconds"]
    run.last_log_t = time.time()
    run.signals = _StopSignals() if threading.current_thread() is threading.main_thread() else None


def _train(run: Run) -> None:
    """Epochs of micro-batches until max_steps, or until the time budget, a signal or bad data stops the run;
    a resumed run skips the micro-batches its epoch had already read."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    run.model.train()
    while not run.stop and state["step"] < cfg.max_steps:
        if hasattr(run.dl, "set_epoch"):
            run.dl.set_epoch(state["epoch"])
        epoch_dl = run.dl
        if state["micro_in_epoch"]:
            epoch_dl = accelerator.skip_first_batches(run.dl, state["micro_in_epoch"])
        got_batch = False
        for batch in epoch_dl:
            got_batch = True
            state["micro_in_epoch"] += 1
            run.bad.add(batch["bad"])
            run.seen_items += batch["num_images"] + len(batch["bad"])
            if "pixel_values" not in batch:
                continue
            result = train_step(run, batch)
            if result is None:  # a non-finite loss: no step
                continue
            run.seen_rows += batch["num_rows"]
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            if run.bar is not None:
                run.bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                _log_step(run, *result)
            _after_step(run, step)
            if step >= cfg.max_steps or run.stop:
                break
        else:
            if not got_batch and not state["micro_in_epoch"]:
                raise TrainingError(f"the training data gives no full batch of {cfg.batch_size}: "
                                    "use a smaller batch_size or more data")
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
            if run.streamed and "epoch_items" not in state:  # a stream's size: what its first pass read
                state["epoch_items"] = run.seen_items


def train_step(run: Run, batch: dict):
    """One micro-batch: forward (the ITC loss ramped in over objectives.itc_warmup_steps), the finite check,
    backward, clipping, the optimizer and scheduler step, all inside Accelerate's `accumulate` (which holds
    the step until the last micro-batch of grad_accum). Returns (loss, outputs), or None when the loss was
    not finite: its gradients are dropped, and five in a row stop the run."""
    cfg, accelerator, state, model = run.cfg, run.accelerator, run.state, run.model
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    if run.cache is not None:
        cached = run.cache.vision_outputs(run.unwrapped, inputs["pixel_values"], batch["image_ids"])
        if cached is not None:
            inputs["vision_outputs"] = cached
            del inputs["pixel_values"]
    with accelerator.accumulate(model):
        outputs = run.train_forward(**inputs)
        loss = outputs.loss
        ramp = cfg.objectives.itc_warmup_steps
        if ramp and state["step"] < ramp and outputs.itc_loss is not None:
            # model loss = lm + w * itc; take back the part of w * itc not yet ramped in
            loss = loss - (1 - state["step"] / ramp) * cfg.objectives.itc_weight * outputs.itc_loss
        finite = torch.isfinite(loss.detach()).float()
        if accelerator.num_processes > 1:
            # One collective for both: every loss finite (min), and a stop signal anywhere
            # (min of minus the flags = minus their max), so all processes stop at one step.
            signals = run.signals
            flags = torch.stack([finite, finite.new_tensor(-float(bool(signals and signals.signum)))])
            flags = accelerator.reduce(flags, reduction="min")
            finite, run.asked_to_stop = flags[0], run.asked_to_stop or bool(flags[1] < 0)
        if finite.item() < 1:
            state["nonfinite"] += 1
            run.consecutive_nonfinite += 1
            run.optimizer.zero_grad(set_to_none=True)
            if run.consecutive_nonfinite >= 5:
                raise TrainingError(
                    f"{run.consecutive_nonfinite} non-finite losses in a row at step {state['step']}: "
                    "lower optim.lr, raise optim.warmup_steps, or use precision=no/bf16"
                )
            return None
        run.consecutive_nonfinite = 0
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.optim.grad_clip:
            run.grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, outputs


def _log_step(run: Run, loss, outputs) -> None:
    """The step's record: into OUT/metrics.jsonl and the trackers, and onto the progress bar."""
    cfg, step = run.cfg, run.state["step"]
    now = time.time()
    rec = {
        "step": step,
        "epoch": run.state["epoch"],
        "loss": loss.item(),
        "lm_loss": outputs.lm_loss.item() if outputs.lm_loss is not None else None,
        "itc_loss": outputs.itc_loss.item() if outputs.itc_loss is not None else None,
        "bow_loss": outputs.bow_loss.item() if outputs.bow_loss is not None else None,
        "lr": run.scheduler.get_last_lr()[0],
        # before clipping; a spike here is what precedes a contrastive collapse
        "grad_norm": float(run.grad_norm) if run.grad_norm is not None else None,
        "logit_scale": _logit_scale(run.unwrapped),
        "rows_per_s": (run.seen_rows - run.last_log_rows) * run.accelerator.num_processes
        / max(1e-9, now - run.last_log_t),
        "elapsed_s": now - run.t0,
    }
    run.last_log_t, run.last_log_rows = now, run.seen_rows
    if run.main:
        log_record(run.metrics_path, rec)
        if run.bar is not None:
            post = {"loss": f"{rec['loss']:.3f}", "rows_s": f"{rec['rows_per_s']:.0f}"}
            if cfg.max_minutes:
                post["min_left"] = f"{max(0.0, cfg.max_minutes - (now - run.t0) / 60):.1f}"
            run.bar.set_postfix(**post)
    run.accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)


def _after_step(run: Run, step: int) -> None:
    """After each optimizer step: the bad-data check, evaluation and OUT/best (eval_every), a checkpoint
    (checkpoint_every), a stop signal (a checkpoint, then Interrupted), the time budget (run.stop)."""
    cfg, accelerator = run.cfg, run.accelerator
    try:  # judged from 200 records on, or once a whole pass was read (the fraction is then known)
        run.bad.check(run.distinct_seen(), cfg.data.max_bad_fraction, min_seen=200, final=run.state["epoch"] > 0)
    except DataError as err:
        if accelerator.num_processes > 1:  # each process judges its own share: no common stop
            raise DataError(f"{err} (no model saved: the processes of a distributed run stop "
                            "separately; the last checkpoint, if any, holds the run)") from None
        run.bad_stop, run.stop = err, True
    saved = None
    if cfg.eval_every and step % cfg.eval_every == 0 and cfg.data.validation:
        evaluate_and_keep_best(run, step)
        run.model.train()
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        saved = save_run_checkpoint(run, step)
    signals = run.signals
    if signals is not None and (signals.signum if accelerator.num_processes == 1 else run.asked_to_stop):
        saved = saved or save_run_checkpoint(run, step)
        accelerator.end_training()  # trackers flush and close
        raise Interrupted(signals.signum or signal.SIGTERM, step, saved)
    if _STEP_DELAY:
        time.sleep(_STEP_DELAY)  # test hook: slows steps so a test can kill the run mid-way
    if cfg.max_minutes and (time.time() - run.t0) / 60 >= cfg.max_minutes:
        run.stop = True


def _logit_scale(model) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else None


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the step in flight, with a checkpoint of it; a second
    signal acts at once (the handlers before these are put back by the first)."""

    def __init__(self):
        self.signum = 0
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
