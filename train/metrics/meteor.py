"""METEOR (``meteor-1.5.jar``, a Java program) in a guarded subprocess, for :mod:`train.metrics.caption`.

:class:`_Meteor` speaks pycocoevalcap's protocol with the jar, with deadlines: a crash, a hang
past the timeout or a failed start raises :class:`MeteorError` (which ``caption_metrics`` turns
into a warning). One process can be kept between calls (``caption_metrics(keep_meteor=True)``):
:func:`open_meteor` and :func:`release_meteor` manage it under :data:`kept_lock`, and
:func:`close_meteor` stops it (also at interpreter exit).

Only the standard library is imported here; pycocoevalcap only to find the jar.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

__all__ = ["MeteorError", "close_meteor"]


class MeteorError(RuntimeError):
    """The METEOR subprocess failed, hung or gave output we could not read."""


def _meteor_command() -> tuple[list[str], str]:
    """The command pycocoevalcap's ``Meteor`` runs, and the folder it runs it in."""
    from pycocoevalcap.meteor import meteor

    folder = os.path.dirname(os.path.abspath(meteor.__file__))
    jar = getattr(meteor, "METEOR_JAR", "meteor-1.5.jar")
    java = shutil.which("java") or "java"
    return [java, "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"], folder


class _Meteor:
    """pycocoevalcap's METEOR protocol (``SCORE`` lines, then one ``EVAL`` line) with guards.

    pycocoevalcap's ``Meteor`` blocks forever when the jar stops answering (e.g. stuck on a full
    stderr pipe or out of memory), turns a crash into an unhelpful ``ValueError``, and can
    deadlock in ``__del__`` after an error. Here stdout is read by a thread with a deadline,
    stderr goes to a file, and the process is always killed at the end. The strings sent are
    the ones pycocoevalcap sends, so the score is the same.
    """

    def __init__(self) -> None:
        cmd, cwd = _meteor_command()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self._proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr)
        except OSError as e:
            self._stderr.close()
            raise MeteorError(f"cannot start METEOR ({e})") from e
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def _write(self, data: bytes, deadline: float) -> None:
        def write():
            try:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
            except (OSError, ValueError) as e:
                errors.append(e)

        errors: list[Exception] = []
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(max(0.0, deadline - time.monotonic()))
        if writer.is_alive():
            raise MeteorError("METEOR stopped reading its input (timed out)")
        if errors:
            raise MeteorError(f"METEOR closed its input ({errors[0]}){self._stderr_tail()}")

    def _readline(self, deadline: float) -> str:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise MeteorError("METEOR timed out") from None
        if line is None:
            code = self._proc.poll()
            raise MeteorError(f"METEOR exited (code {code}){self._stderr_tail()}")
        return line.decode("utf-8", "replace").strip()

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            tail = self._stderr.read()[-1500:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f": {tail}" if tail else ""

    def score(self, refs: Sequence[Sequence[str]], hyps: Sequence[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        score_lines = []
        for ref, hyp in zip(refs, hyps):
            hyp = hyp.replace("|||", "").replace("  ", " ")
            # pycocoevalcap does not clean references; a "|||" in one would break the protocol.
            ref = [r.replace("|||", "") for r in ref]
            score_lines.append(" ||| ".join(("SCORE", " ||| ".join(ref), hyp)) + "\n")
        self._write("".join(score_lines).encode("utf-8"), deadline)
        stats = [self._readline(deadline) for _ in hyps]
        self._write(("EVAL" + "".join(f" ||| {s}" for s in stats) + "\n").encode("utf-8"), deadline)
        for _ in hyps:  # per-caption scores, not reported
            self._readline(deadline)
        line = self._readline(deadline)
        try:
            return float(line)
        except ValueError:
            raise MeteorError(f"unexpected METEOR output {line[:200]!r}") from None

    def close(self) -> None:
        proc = self._proc
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if proc.stdout:
            proc.stdout.close()
        self._stderr.close()

    def alive(self) -> bool:
        return self._proc.poll() is None

# One METEOR process kept between calls with keep_meteor=True (its start-up, which loads a
# paraphrase table, takes 5-20 s; the process then holds about 1-2 GB of memory).
_kept_meteor: _Meteor | None = None
kept_lock = threading.Lock()  # held while the kept process is used, started or stopped


def close_meteor() -> None:
    """Stop the METEOR process kept by ``caption_metrics(..., keep_meteor=True)``, if any."""
    global _kept_meteor
    with kept_lock:
        if _kept_meteor is not None:
            _kept_meteor.close()
            _kept_meteor = None


atexit.register(close_meteor)


def open_meteor(keep: bool) -> _Meteor:
    """A METEOR process: with ``keep`` the kept one when it is alive, else a new one that is kept
    (hold :data:`kept_lock`); without ``keep`` a new one. Raises :class:`MeteorError` when it cannot
    start (a dead kept process is dropped first)."""
    global _kept_meteor
    if keep and _kept_meteor is not None and _kept_meteor.alive():
        return _kept_meteor
    if keep and _kept_meteor is not None:
        _kept_meteor.close()
        _kept_meteor = None
    meteor = _Meteor()
    if keep:
        _kept_meteor = meteor
    return meteor


def release_meteor(meteor: _Meteor | None, keep: bool, failed: bool) -> None:
    """Done with ``meteor`` (from :func:`open_meteor`): it is closed unless it is the kept process
    and did not fail (a failed kept process is dropped)."""
    global _kept_meteor
    if meteor is not None and (not keep or failed):
        meteor.close()
        if keep:
            _kept_meteor = None
