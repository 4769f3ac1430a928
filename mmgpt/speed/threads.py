"""Thread count for inference on a shared CPU.

On a machine whose other cores are busy with another process, every parallel region of an op
waits for those cores' time slices (milliseconds each), while the same op on one thread runs at
once. An encoder forward or a decoding step of small ops has dozens of such regions, so it can
run many times slower on two threads than on one. `cores_free` asks the kernel, in well under a
millisecond, whether other processes' threads are running now; `one_thread` runs a block on one
thread when they are.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

_PROBE: dict = {}


def _running_elsewhere() -> int | None:
    """Threads of other processes running now: the kernel's `procs_running` (/proc/stat) less this
    process's own threads in state R. None where /proc cannot say (not Linux)."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith(b"procs_running"))
        ours = 0
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_bytes()
            except OSError:  # the thread ended meanwhile
                continue
            ours += stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"R"
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, running - ours)


def cores_free(max_age: float = 0.5) -> bool:
    """True when the cores torch's threads need are free: the threads of other processes running
    (the middle of three looks at the kernel's run queue) leave `torch.get_num_threads()` cores. Also
    True with one thread, off Linux, and when this process may use only some of the CPUs. An answer
    younger than `max_age` seconds is reused.

    (It used to time a small product on one thread and on all; on an idle machine the other
    thread's wake-up after ~10 ms of sleep made that read "busy" 8 times in 10, and a busy loop on
    the other core was caught only 2-4 times in 10.)"""
    n_threads = torch.get_num_threads()
    if n_threads < 2:
        return True
    now = time.perf_counter()
    if _PROBE.get("at", -1e9) > now - max_age and _PROBE.get("threads") == n_threads:
        return _PROBE["free"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # The run queue counts every CPU's tasks: it says nothing when this process may use only some of
    # them (taskset, a container's cpuset), so then torch keeps its threads, as it would anyway.
    looks = [_running_elsewhere() for _ in range(3)] if cores == os.cpu_count() else [None]
    if None in looks:
        free = True
    else:
        free = sorted(looks)[1] + n_threads <= cores  # the middle look: one racy read can't decide
    _PROBE.update(at=time.perf_counter(), threads=n_threads, free=free)
    return free


@contextmanager
def one_thread(active: bool = True):
    """torch on one thread inside the block (when `active`), the previous count after it."""
    n_threads = torch.get_num_threads()
    if active and n_threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
