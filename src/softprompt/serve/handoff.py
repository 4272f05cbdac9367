"""From the engine's thread to the event loop: answers and stream pieces, handed over in
bursts.

The engine's worker thread produces, per decode step, one piece of text for every
streaming row and, per run, one answer for every request. Handed over one by one
(`loop.call_soon_threadsafe` per piece, `asyncio.wrap_future` per answer), each is a
write to the loop's wake-up pipe, a loop iteration and a task switch: about 80 us of the
loop's CPU per streamed token on the 2-core CI machine (`bench.probe.server_cpu`), for
64 rows a step, which made the loop, not the GPU, the ceiling of a streaming server.

`Mailbox` queues callbacks from any thread and wakes the loop once for everything queued
until it runs them; `Pieces` is one stream's buffer that its response drains whole at
each wake-up, and `Mailbox.future` an answer as an asyncio future.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable


class Mailbox:
    """Callbacks queued from other threads, run on `loop` in the order queued; the loop is
    woken once per burst (the first `post` after it last drained), not once per callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._queued: list[tuple[Callable[..., Any], tuple]] = []
        self._woken = False

    def post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` on the loop soon (any thread; never blocks on the loop)."""
        with self._lock:
            self._queued.append((callback, args))
            if self._woken:
                return
            self._woken = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (shutting down): no one is left to tell
            pass

    def _drain(self) -> None:
        with self._lock:
            queued, self._queued, self._woken = self._queued, [], False
        for callback, args in queued:
            callback(*args)

    def future(self, done: Future) -> asyncio.Future:
        """`done` (a concurrent future the engine's thread resolves) as a future of the loop,
        resolved through the mailbox; cancelling it cancels `done` (a request not yet run
        is then dropped), as `asyncio.wrap_future` does."""
        waiting = self.loop.create_future()

        def settle(source: Future) -> None:
            if waiting.cancelled():
                return
            if source.cancelled():
                waiting.cancel()
            elif source.exception() is not None:
                waiting.set_exception(source.exception())
            else:
                waiting.set_result(source.result())

        waiting.add_done_callback(lambda f: f.cancelled() and done.cancel())
        done.add_done_callback(lambda source: self.post(settle, source))
        return waiting


class Pieces:
    """One stream's pieces as they arrive (`put`, on the loop), taken all at once by the
    response (`take`), which waits only when there are none; `close` (its requests are
    all answered) ends the waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.closed = False
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._wanted = 1  # pieces the waiting `take` wants before it wakes

    def put(self, item: Any) -> None:
        self._items.append(item)
        if len(self._items) >= self._wanted:
            self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def ready(self, at_least: int = 1) -> asyncio.Future:
        """A future done once `at_least` pieces are there or the stream is closed."""
        self._wanted = at_least
        if self._waiter is None or self._waiter.done():
            self._waiter = self.loop.create_future()
        if len(self._items) >= at_least or self.closed:
            self._waiter.set_result(None)
        return self._waiter

    def take_now(self) -> list:
        """Every piece there now (maybe none)."""
        items = list(self._items)
        self._items.clear()
        return items

    async def take(self, at_least: int = 1) -> list:
        """Every piece there, waiting until there are `at_least` (a stream interval: one
        write for that many tokens) unless the stream closes first; [] once closed and
        drained."""
        while len(self._items) < at_least and not self.closed:
            await self.ready(at_least)
        return self.take_now()


__all__ = ["Mailbox", "Pieces"]
