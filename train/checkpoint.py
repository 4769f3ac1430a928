"""Checkpoints: `accelerator.save_state` into OUT/checkpoints/step-N, atomically, keeping the last K.

A checkpoint is written into `.tmp-step-N`, every file of it fsynced, then renamed into place: a kill
leaves no half checkpoint, and a power loss no renamed folder of unwritten files. A full disk removes
the partial folder and becomes one line (`DiskFull`): "no space left on DEVICE at PATH: ...".
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
LOW_SPACE = 16 * 2**20  # a failed write with less free than this is taken for a full disk


class DiskFull(RuntimeError):
    """A write failed for want of space; the message is one line that says where and what to do."""


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints renamed into place (a folder is complete once it is), oldest first."""
    return [p for p in list_checkpoints(Path(ckpt_dir)) if (p / "trainer_state.json").is_file()]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    ckpts = complete_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def previous_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint older than `ckpt` in its folder."""
    older = [p for p in complete_checkpoints(ckpt.parent) if _step(p) < _step(ckpt)]
    return older[-1] if older else None


def _step(ckpt: Path) -> int:
    m = STEP_DIR.match(ckpt.name)
    return int(m.group(1)) if m else -1


# --- a full disk ---------------------------------------------------------------------------------


def device_of(path: Path) -> str:
    """The device (or filesystem) a path lies on, from /proc/mounts; 'the disk' where that is unknown."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        mounts = [line.split()[:2] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "the disk"
    path_s = str(path.resolve())
    best = max((m for m in mounts if len(m) == 2 and (path_s == m[1] or path_s.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    return f"{best[0]} (mounted at {best[1]})" if best else "the disk"


def is_disk_full(err: BaseException, path: Path | None = None) -> bool:
    """ENOSPC / EDQUOT, or a writer that hides the errno (safetensors: 'StorageFull'; torch.save: 'file write
    failed') on a disk with almost no space left."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    text = str(err)
    if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
        return True
    if path is not None and "write" in text.lower():
        try:
            return shutil.disk_usage(_existing(path)).free < LOW_SPACE
        except OSError:
            return False
    return False


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_full_message(err: BaseException, path: Path, what: str) -> str:
    where = getattr(err, "filename", None) or path
    return f"no space left on {device_of(Path(where))} at {where}: {what}"


# --- writing -------------------------------------------------------------------------------------


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders (their entries), deepest first."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(root)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_dir(Path(d))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writes_files(accelerator) -> bool:
    """Whether this process writes the run's files: the main process, or with Accelerate's
    ``save_on_each_node`` (machines without a shared file system) the first process of each machine."""
    if getattr(accelerator.project_configuration, "save_on_each_node", False):
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write into a temporary folder, fsync it, then rename: a kill mid-write leaves no half checkpoint.
    DiskFull (the temporary folder removed) when the disk fills up."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    writer = writes_files(accelerator)  # with save_on_each_node: one process per machine
    try:
        if writer:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if writer:
            (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
            fsync_tree(tmp)  # the weights and optimizer too, not only trainer_state.json
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(ckpt_dir)
    except Exception as err:
        if not is_disk_full(err, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(ckpt_dir)
        then = f"continue with resume=latest (from {last.name})" if last else "run again"
        raise DiskFull(disk_full_message(err, tmp, f"checkpoint of step {step} not written (its partial folder was "
                                                   f"removed); free some space, then {then}")) from None
    if writer:
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_folder_atomically(write: Callable[[Path], None], final: Path) -> None:
    """`write(tmp)` fills a temporary folder beside `final`, which is fsynced and renamed to `final`
    (an older `final` is replaced only then). DiskFull, the temporary folder removed, on a full disk."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err, tmp):
            raise DiskFull(disk_full_message(err, tmp, f"{final.name} not written (its partial folder was removed)")) from None
        raise


def truncate_log_after(path: Path, step: int) -> None:
    """Cut a JSON-lines log after its last line of a step <= `step`, in place (truncation needs no free
    space, unlike a rewrite)."""
    if not path.is_file():
        return
    offset = 0
    with path.open("rb+") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) > step:
                    break
            except ValueError:
                break
            offset += len(line)
        f.truncate(offset)


# --- reading -------------------------------------------------------------------------------------


def _read(path: Path) -> None:
    """Load a checkpoint file as Accelerate would; raises when it is unreadable."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(path)
    else:
        from accelerate.utils import load

        load(path, map_location="cpu")


def unreadable_file(ckpt: Path) -> tuple[str, str] | None:
    """(file name, reason) of the first file of a checkpoint that does not load; None when all do."""
    for path in sorted(ckpt.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pkl"):
            try:
                _read(path)
            except Exception as err:  # noqa: BLE001 - any failure: this file is the culprit
                text = str(err).strip().splitlines()
                return path.name, f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return None


def unreadable_random_states(ckpt: Path, process_index: int) -> str | None:
    """Why the random states of this process cannot be restored (Accelerate then goes on silently with
    fresh ones), or None when they can."""
    path = ckpt / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        _read(path)
    except Exception as err:  # noqa: BLE001
        text = str(err).strip().splitlines()
        return f"{path.name} is unreadable ({type(err).__name__}: {text[0] if text else ''})"
    return None
