"""Dynamic batching: concurrent callers' requests, gathered into engine runs.

Callers (the HTTP server's handlers, on its event loop) `submit` requests and await their
results; one worker thread takes whatever is waiting, up to the engine's batch budget,
after a short gathering window, runs it (`Engine.run` mixes the tasks and cuts batches)
and hands each caller its answers. The queue is bounded: past `max_queue` waiting
requests, `submit` refuses at once (the server answers 429) instead of growing without
limit.

Generation on a causal LM is continuously batched within one engine run (`decode.py`):
a row that ends (end of sequence, a stop string, a client gone) leaves the running batch
at once and a waiting row of that run takes its place. Requests that arrive while a run
decodes wait for the next run (the decoder's `admit` hook can take them; the worker does
not feed it yet). Encoder-decoders use transformers' `generate()` in static batches.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import SoftPromptError
from .engine import Engine, Request, Result


class QueueFullError(SoftPromptError):
    """More requests are waiting than the server takes (HTTP 429)."""


@dataclass
class BatchStats:
    """What /metrics reports: filled in by the worker after every run."""

    runs: int = 0
    rows: int = 0
    busy_seconds: float = 0.0
    new_tokens: int = 0
    observers: list[Callable[[int, float, list[Result]], None]] = field(default_factory=list)


class Batcher:
    """A bounded queue in front of an `Engine`, served by one worker thread.

    Args:
        engine: runs the batches.
        max_queue: most requests waiting (beyond it `submit` raises `QueueFullError`).
        max_wait: seconds the worker waits for more requests before it runs a batch that
            is not full yet (latency traded for batch size).
    """

    def __init__(self, engine: Engine, *, max_queue: int = 1024, max_wait: float = 0.005):
        self.engine = engine
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.stats = BatchStats()
        self._queue: queue.Queue[tuple[Request, Future]] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken by the worker."""
        return self._waiting

    def submit(self, requests: Sequence[Request]) -> list[Future]:
        """Queue requests; each future resolves to its `Result`.

        Raises:
            QueueFullError: the queue cannot take them all (none is queued then).
        """
        with self._lock:
            if self._stopped.is_set():
                raise QueueFullError("the server is shutting down")
            if self._waiting + len(requests) > self.max_queue:
                raise QueueFullError(f"{self._waiting} requests are waiting (the queue holds {self.max_queue}); "
                                     "retry later")
            self._waiting += len(requests)
        futures = []
        for request in requests:
            future: Future = Future()
            self._queue.put((request, future))
            futures.append(future)
        return futures

    async def run(self, requests: Sequence[Request]) -> list[Result]:
        """Submit and await the results (for an asyncio caller)."""
        futures = self.submit(requests)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def close(self) -> None:
        self._stopped.set()
        self._queue.put(None)  # wakes the worker
        self._worker.join(timeout=30)

    # -- the worker -----------------------------------------------------------
    def _take(self) -> list[tuple[Request, Future]]:
        first = self._queue.get()
        if first is None:
            return []
        taken = [first]
        limit = self.engine.max_batch_rows * 4  # the engine cuts this into budgeted batches
        deadline = time.monotonic() + self.max_wait
        while len(taken) < limit:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopped.set()
                break
            taken.append(item)
        with self._lock:
            self._waiting -= len(taken)
        return taken

    def _work(self) -> None:
        while not self._stopped.is_set():
            taken = self._take()
            if not taken:
                continue
            live = [(r, f) for r, f in taken if f.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = self.engine.run([r for r, _ in live])
            except BaseException as e:  # the engine isolates request failures; this is a bug
                for _, f in live:
                    f.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            self.stats.runs += 1
            self.stats.rows += len(live)
            self.stats.busy_seconds += seconds
            self.stats.new_tokens += sum(r.new_tokens for r in results)
            for observe in self.stats.observers:
                observe(len(live), seconds, results)
            for (_, f), result in zip(live, results):
                f.set_result(result)
        while True:  # shutting down: answer what is left
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(QueueFullError("the server is shutting down"))


__all__ = ["Batcher", "QueueFullError", "BatchStats"]
