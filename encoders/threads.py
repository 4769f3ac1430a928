"""Thread count for inference on a shared CPU.

On a machine whose other cores are busy with another process, every parallel region of an op
waits for those cores' time slices (milliseconds each), while the same op on one thread runs at
once. An encoder forward or a decoding step of small ops has dozens of such regions, so it can
run many times slower on two threads than on one. `cores_free` asks the machine, in about a
millisecond, whether the other threads start at once; `threads_for_inference` runs a block on
one thread when they do not.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

_PROBE: dict = {}


def cores_free(max_age: float = 0.5) -> bool:
    """A product that splits across threads (two 3 MB matrices), timed on one thread and then on
    all, with the other threads idle as they are between calls: True when all threads finish it
    clearly faster. Also True with one thread. An answer younger than `max_age` seconds is reused
    (a contended probe costs a time slice, ~8 ms)."""
    n_threads = torch.get_num_threads()
    if n_threads < 2:
        return True
    now = time.perf_counter()
    if _PROBE.get("at", -1e9) > now - max_age and _PROBE.get("threads") == n_threads:
        return _PROBE["free"]
    if not _PROBE:
        g = torch.Generator().manual_seed(0)
        _PROBE["x"] = torch.randn(2, 1, 384, generator=g)
        _PROBE["w"] = torch.randn(2, 384, 1024, generator=g)
    x, w = _PROBE["x"], _PROBE["w"]
    torch.set_num_threads(1)
    try:
        torch.bmm(x, w)  # reads the probe into cache
        t0 = time.perf_counter()
        torch.bmm(x, w)
        t1 = time.perf_counter()
    finally:
        torch.set_num_threads(n_threads)
    torch.bmm(x, w)
    t2 = time.perf_counter()
    _PROBE.update(at=t2, threads=n_threads, free=t2 - t1 < 0.8 * (t1 - t0))
    return _PROBE["free"]


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
