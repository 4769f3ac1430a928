"""Dynamic batching: concurrent requests wait in one asyncio queue; one worker takes up to
`max_batch_size` items that arrive within `max_wait_ms` of the first, groups them by what must be
run together (task and generation options), and runs each group as one model call in a thread.

The event loop never runs the model, so requests keep arriving while a batch runs; they form the
next batch. With `max_batch_size=1` every item is its own call (batching off).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# run_batch(key, items) -> one result per item, in order. Runs in the worker thread.
RunBatch = Callable[[Hashable, list], Sequence]


@dataclass
class BatchStats:
    """What the worker has done; `sizes` counts model calls by batch size."""

    batches: int = 0
    items: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def add(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] = self.sizes.get(size, 0) + 1


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future


class DynamicBatcher:
    """`await batcher.submit(key, item)` -> the result for `item`; items with equal keys share calls.

    Start it inside the event loop that will submit to it (`await start()`), and `await stop()` at
    shutdown. A caller that stops waiting (timeout, disconnect) cancels its future; an item whose
    future is cancelled before its batch starts is dropped, never run.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int = 16, max_wait_ms: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmgpt-batch")
        self._worker = asyncio.create_task(self._loop(), name="mmgpt-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        if self._queue is not None:  # whoever still waits gets an answer, not a hang
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, key: Hashable, item: Any) -> Any:
        if not self.running:
            raise RuntimeError("the batcher is not running: start it (the app's lifespan does) before submitting")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(key, item, future))
        return await future

    async def submit_many(self, key: Hashable, items: Sequence) -> list:
        """Each item queued on its own, so a request's items can share batches with other requests'."""
        return list(await asyncio.gather(*(self.submit(key, item) for item in items)))

    # --- the worker ------------------------------------------------------------------------------

    async def _collect(self) -> list[_Pending]:
        """The first item (waiting as long as it takes), then more until full or max_wait has passed."""
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run_one(self, loop, key: Hashable, pending: _Pending) -> None:
        if pending.future.done():
            return
        try:
            (result,) = await loop.run_in_executor(self._executor, self.run_batch, key, [pending.item])
        except Exception as err:  # noqa: BLE001 - handed to the waiting request, which raises it
            if not pending.future.done():
                pending.future.set_exception(err)
            return
        if not pending.future.done():
            pending.future.set_result(result)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[Hashable, list[_Pending]] = {}
            for pending in await self._collect():
                if not pending.future.done():  # cancelled while queued: nobody wants it
                    groups.setdefault(pending.key, []).append(pending)
            for key, group in groups.items():
                self.stats.add(len(group))
                try:
                    results = await loop.run_in_executor(self._executor, self.run_batch, key, [p.item for p in group])
                    if len(results) != len(group):
                        raise RuntimeError(f"run_batch returned {len(results)} results for {len(group)} items")
                except Exception as err:
                    if len(group) > 1:  # one bad item must not fail the others: each alone, its own result
                        log.warning("batch %r of %d failed (%s); running its items one by one", key, len(group), err)
                        for p in group:
                            await self._run_one(loop, key, p)
                        continue
                    log.exception("batch %r of %d failed", key, len(group))
                    if not group[0].future.done():
                        group[0].future.set_exception(err)
                    continue
                for p, result in zip(group, results):
                    if not p.future.done():
                        p.future.set_result(result)
