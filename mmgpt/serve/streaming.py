"""Streamed answers: a stream slot (at most `max_streams` answers generated at once) held while one is
generated, a stopping criterion that ends generate() when the client leaves or time runs out, and the
server-sent events of `POST /v1/ask/stream`. The OpenAI-compatible chat stream (openai_api.py) holds its
slot the same way."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import torch

log = logging.getLogger(__name__)

END = object()  # what next(pieces, END) gives once an answer has no more pieces


class Cancel:
    """A stopping criterion for generate(): ends generation once `event` is set (client gone, timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StreamSlot:
    """One streamed answer's hold on the server's stream slots (`slots[0]`, a semaphore made in the app's
    lifespan) and the event that stops its generate(); `release()` does both, once."""

    def __init__(self, slots: list[asyncio.Semaphore]):
        self.slots = slots
        self.cancel = threading.Event()
        self.held = False

    def stopping_criteria(self):
        from transformers import StoppingCriteriaList

        return StoppingCriteriaList([Cancel(self.cancel)])

    def release(self) -> None:  # once: stops generate() and frees the stream slot
        self.cancel.set()
        if self.held:
            self.held = False
            self.slots[0].release()

    async def start(self, begin: Callable[[], Iterator[str]],
                    unread_s: Callable[[], float]) -> tuple[Iterator[str], object]:
        """Waits for a slot, then runs `begin()` (-> the answer's pieces) and reads the first piece, both in a
        thread: errors before the first byte become the status line. Any error frees the slot, and so does
        `unread_s()` + 1 s passing once it is held (a response whose body is never read: the client gone)."""
        await self.slots[0].acquire()
        self.held = True
        asyncio.get_running_loop().call_later(unread_s() + 1, self.release)
        try:
            pieces = await asyncio.to_thread(begin)
            return pieces, await asyncio.to_thread(next, pieces, END)
        except BaseException:
            self.release()
            raise


async def next_piece(pieces: Iterator[str], deadline: float):
    """The next piece (END after the last), read in a thread; asyncio.TimeoutError past `deadline`."""
    return await asyncio.wait_for(asyncio.to_thread(next, pieces, END), max(deadline - time.monotonic(), 0))


def sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def answer_events(pieces: Iterator[str], first, slot: StreamSlot, deadline: float,
                        timeout_s: float) -> AsyncIterator[str]:
    """/v1/ask/stream's events: `data: {"text": piece}` per piece, then `event: done` with the answer (or
    `event: error`); the slot is freed at the end, which ends generate() early when the client went away."""
    answer, piece = "", first
    try:
        while piece is not END:
            answer += piece
            yield sse({"text": piece})
            piece = await next_piece(pieces, deadline)
        yield sse({"answer": answer}, "done")
    except asyncio.TimeoutError:
        yield sse({"detail": f"no full answer within {timeout_s:g} s"}, "error")
    except Exception as err:  # the status line is sent; the error goes in the stream
        log.exception("streaming answer failed")
        yield sse({"detail": f"generation failed ({type(err).__name__})"}, "error")
    finally:
        slot.release()  # ends generate() early when the client went away or time ran out
