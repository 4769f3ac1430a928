"""What a training run leaves besides its checkpoints, and its last phase.

`evaluate_and_keep_best`: the validation scores into the log (every eval_every steps, or once at the end)
and OUT/best when cfg.best_metric improved. `finish_run`: the final evaluation, OUT/model with its model
card (written whole or not at all), the last word on bad records, and the run's summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmgpt.model_card import write_run_cards
from train.checkpoint import (
    DiskFull,
    latest_checkpoint,
    truncate_log_after,
    write_folder_atomically,
    writes_files,
)
from train.config import TrainConfig, to_dict
from train.data.bad import DataError
from train.parts import export_model
from train.run_setup import Run, build_sources


def log_record(path: Path, record: dict) -> None:
    """One line of OUT/metrics.jsonl."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate_and_keep_best(run: Run, step: int) -> None:
    """Evaluate on the validation data (run.summary) and export OUT/best when the best metric improved."""
    run.summary = _evaluate(run.accelerator, run.unwrapped, run.processor, run.cfg, step, run.metrics_path)
    run.best = _keep_best(run.accelerator, run.unwrapped, run.processor, run.cfg, run.summary, run.best, run.out,
                          step)


def finish_run(run: Run) -> dict:
    """The last phase: a final evaluation (without eval_every), OUT/model and its card, the trackers
    closed; then DataError if bad records stopped the run or are too many. Returns the run's summary."""
    cfg, accelerator, state, out = run.cfg, run.accelerator, run.state, run.out
    if run.bar is not None:
        run.bar.close()
    train_seconds = time.time() - run.t0
    accelerator.wait_for_everyone()
    distinct = run.distinct_seen()
    if run.bad.total and run.main:
        print(run.bad.summary(distinct), flush=True)
    if cfg.data.validation and not cfg.eval_every:
        evaluate_and_keep_best(run, state["step"])
    if run.main:
        _export_final(run.unwrapped, run.processor, cfg, out, state["step"])
        write_run_cards(out, to_dict(cfg), state["step"], train_seconds)  # README.md cards in OUT/model, OUT/best
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if run.bad_stop is not None:
        raise DataError(f"stopped at step {state['step']} of {cfg.max_steps}: {run.bad_stop}\n(the model trained "
                        f"until then on the good records was saved to {out / 'model'})") from None
    try:  # judged on the whole run now (a short run never reached the mid-run check's minimum)
        run.bad.check(distinct, cfg.data.max_bad_fraction, final=True)
    except DataError as err:
        raise DataError(f"{err}\n(the model trained on the good records was still saved to {out / 'model'})") from None
    cache = run.cache
    if cache is not None and run.main:
        print(f"feature cache: {cache.hits} hits, {cache.misses} misses, {cache.bytes / 2**20:.0f} MiB", flush=True)
    return {"step": state["step"], "train_seconds": train_seconds, "nonfinite_steps": state["nonfinite"],
            "bad_records": run.bad.to_dict(), "eval": run.summary, "model_dir": str(out / "model")}


def _evaluate(accelerator, model, processor, cfg, step, metrics_path) -> dict:
    from train.evaluate import evaluate

    metrics = {}
    # every process reads the same validation records and runs its share of the images (train.dist_eval)
    val = build_sources(cfg.data.validation, grouped=False)
    n = len(val)
    records = _first_images(val, cfg.data.eval_images)
    was_training = model.training
    model.eval()
    result = evaluate(model, processor, records, device=accelerator.device, caption_scorers=("bleu", "cider"))
    if was_training:
        model.train()
    if writes_files(accelerator):
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        log_record(metrics_path, {"step": step, "eval": metrics, "validation_records": n})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        shown = (f"{k}={int(v)}" if k.startswith(("num_", "bad_")) else f"{k}={v:.3f}"  # counts as counts
                 for k, v in metrics.items() if "/" not in k)
        print(f"step {step}: " + ", ".join(shown), flush=True)
    accelerator.wait_for_everyone()
    return metrics


def _first_images(dataset, n_images: int) -> list[dict]:
    """Records of the first `n_images` distinct images (all their records)."""
    if hasattr(dataset, "records_for_image"):
        recs = []
        for i in range(min(n_images, dataset.size)):
            recs += dataset.records_for_image(i)
        return recs
    from train.data.records import image_key

    recs, ids = [], set()
    for i in range(len(dataset)):
        r = dataset[i]
        if not isinstance(r, dict):
            continue
        key = image_key(r)
        if key not in ids and len(ids) >= n_images:
            break
        ids.add(key)
        recs.append(r)
    return recs


def _keep_best(accelerator, model, processor, cfg, metrics, best, out: Path, step: int):
    if not cfg.best_metric or not metrics or cfg.best_metric not in metrics:
        return best
    value = metrics[cfg.best_metric]
    if best is None or value > best:
        if writes_files(accelerator):

            def write(folder: Path) -> None:
                export_model(model, processor, folder, cfg.lora.enabled)
                (folder / "best_metric.json").write_text(json.dumps({cfg.best_metric: value, "step": step}) + "\n")

            write_folder_atomically(write, out / "best")  # a full disk keeps the previous best whole
        return value
    return best


def _export_final(model, processor, cfg: TrainConfig, out: Path, step: int) -> None:
    """OUT/model, written whole or not at all. On a full disk the log is cut back to the last checkpoint
    (what resume=latest trains again from), so metrics.jsonl never runs ahead of a model that exists."""
    try:
        write_folder_atomically(lambda folder: export_model(model, processor, folder, cfg.lora.enabled), out / "model")
    except DiskFull as err:
        last = latest_checkpoint(out / "checkpoints")
        truncate_log_after(out / "metrics.jsonl", int(last.name.split("-")[1]) if last else 0)
        then = (f"metrics.jsonl now ends at {last.name}, the last checkpoint; free some space, then continue with "
                "resume=latest" if last else "no checkpoint was written (metrics.jsonl emptied); free some space, "
                "then run again with overwrite=true")
        raise DiskFull(f"{err} at step {step}; {then}") from None
