"""Checkpoints: `accelerator.save_state` into OUT/checkpoints/step-N, atomically, keeping the last K."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (a folder is complete once renamed into place)."""
    ckpts = [p for p in list_checkpoints(Path(ckpt_dir)) if (p / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write into a temporary folder, then rename: a kill mid-write leaves no half checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
        with open(tmp / "trainer_state.json", "rb") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
