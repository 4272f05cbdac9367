"""Dynamic batching: concurrent callers' requests, gathered into engine runs.

Callers (the HTTP server's handlers, on its event loop) `submit` requests and await their
results; one worker thread takes whatever is waiting, up to the engine's batch budget,
after a short gathering window, runs it (`Engine.run` mixes the tasks and cuts batches)
and hands each caller its answers. The queue is bounded: past `max_queue` waiting
requests, `submit` refuses at once (the server answers 429) instead of growing without
limit; a submission larger than the whole queue is refused as such
(`TooManyRequestsForQueueError`: retrying cannot help).

A request is bound to its task's version when it is submitted (`Engine.bind`); one whose
client has gone (`Request.cancelled`) is dropped while it waits and stops at the next
decode step once running. `close(timeout)` stops in bounded time, hung engine or not.

Generation on a causal LM is continuously batched within one engine run (`decode.py`):
a row that ends (end of sequence, a stop string, a client gone) leaves the running batch
at once and a waiting row takes its place, including generation requests that arrived
while the run decodes (the worker hands them over through the engine's `admit` hook);
requests for task heads that arrive meanwhile are answered between two decode steps, within
their share of the engine's time (`TimeShare`), so that neither kind starves the other.
Encoder-decoders use transformers' `generate()` in static batches.

Each request is stamped when it is queued, taken by the worker and answered
(`Request.queued` / `taken` / `answered`: `timeline.py` makes them a request's stages),
and each run's observers hear how long the gathering window before it took.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SoftPromptError
from .engine import Engine
from .request import GONE, ErrorKind, Request, Result

SHUTTING_DOWN = "the server is shutting down"


class QueueFullError(SoftPromptError):
    """More requests are waiting than the server takes (HTTP 429)."""


class TooManyRequestsForQueueError(SoftPromptError):
    """One submission holds more requests than the queue can ever hold (HTTP 413): unlike
    `QueueFullError`, retrying later cannot help."""


@dataclass
class BatchStats:
    """What /metrics reports: filled in by the worker after every run."""

    runs: int = 0
    rows: int = 0
    busy_seconds: float = 0.0
    new_tokens: int = 0
    #: called after every run with (rows, run seconds, results, gathering seconds: the
    #: `_take` window that gathered its requests; None for head requests run between two
    #: decode steps, which had none)
    observers: list[Callable[[int, float, list[Result], float | None], None]] = field(default_factory=list)


@dataclass
class TimeShare:
    """How the engine's time is shared between decode steps and head forwards while rows
    decode.

    While a causal LM decodes, the decoder asks the batcher for more work between two steps
    (`Batcher._admit`); the head requests waiting then run as one forward, and every decoding
    row waits for it. Running them at every step starved the completions: on an H100
    (`bench.serve.http`, mix phase, 1B shape) completions got 24 + 25 requests/s with p50
    ~610 ms while heads took the rest, each 16-token completion waiting for 16 head forwards.
    Here head forwards take at most `head_share` of the engine's time (head forwards and
    decode steps) over the last `horizon` seconds; a head request that has waited
    `max_head_wait` seconds runs whatever the share, so heads do not starve either (their
    latency is bounded by it plus a decode step). `head_share` 1 runs heads at every step
    (the behaviour before this share); 0 runs them only once they have waited `max_head_wait`.

    Attributes:
        head: seconds of head forwards counted; decode: seconds of decoding counted (the time
            between two calls of the hook, head forwards excluded).
    """

    head_share: float = 0.5
    max_head_wait: float = 0.1
    horizon: float = 2.0
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    head: float = 0.0
    decode: float = 0.0
    _since: float | None = field(default=None, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.head_share <= 1.0:
            raise ValueError(f"head_share must be within [0, 1]; got {self.head_share}")
        if self.max_head_wait < 0:
            raise ValueError(f"max_head_wait must be >= 0 seconds; got {self.max_head_wait}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0 seconds; got {self.horizon}")

    def start(self) -> None:
        """A decoding run begins: nothing counted yet."""
        self.head = self.decode = 0.0
        self._since = self.clock()

    def decoded(self) -> None:
        """The decoder asks for work: the time since it last did was decoding."""
        now = self.clock()
        if self._since is not None:
            self.decode += now - self._since
        self._since = now
        self._forget()

    def heads_may_run(self, waited: float) -> bool:
        """Whether the head requests waiting run now; `waited`: seconds the oldest has waited."""
        if self.head_share >= 1.0 or waited >= self.max_head_wait:
            return True
        return self.head_share > 0.0 and self.head <= self.head_share / (1.0 - self.head_share) * self.decode

    def ran_heads(self, seconds: float) -> None:
        """A head forward took `seconds`; decoding resumes now."""
        self.head += seconds
        self._since = self.clock()
        self._forget()

    def _forget(self) -> None:
        total = self.head + self.decode
        if total > self.horizon:  # the past counts less: scaled down to the horizon
            self.head, self.decode = self.head * self.horizon / total, self.decode * self.horizon / total


class Batcher:
    """A bounded queue in front of an `Engine`, served by one worker thread.

    Args:
        engine: runs the batches.
        max_queue: most requests waiting (beyond it `submit` raises `QueueFullError`).
        max_wait: seconds the worker waits for more requests before it runs a batch that
            is not full yet (latency traded for batch size).
        time_share: how head forwards and decode steps share the engine while rows decode
            (`TimeShare`; its defaults when None).
    """

    def __init__(self, engine: Engine, *, max_queue: int = 1024, max_wait: float = 0.005,
                 time_share: TimeShare | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.time_share = time_share if time_share is not None else TimeShare()
        #: the one clock of a request's stamps (`Request.queued` / `taken` / `answered`) and of
        #: the time share's waits: `time.perf_counter` unless a test fakes the time share's
        self._clock = self.time_share.clock
        self.stats = BatchStats()
        self._items: deque[tuple[Request, Future]] = deque()
        self._running: list[tuple[Request, Future]] = []  # taken by the worker in its current run
        self._cond = threading.Condition()
        self._stopped = False
        self._worker = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken by the worker."""
        return len(self._items)

    def submit(self, requests: Sequence[Request]) -> list[Future]:
        """Queue requests; each future resolves to its `Result`.

        Raises:
            QueueFullError: the queue cannot take them all now (none is queued then).
            TooManyRequestsForQueueError: more requests than the queue ever holds.
        """
        if len(requests) > self.max_queue:
            raise TooManyRequestsForQueueError(
                f"{len(requests)} inputs in one request, more than the server's queue ever holds: send at most "
                f"{self.max_queue} at a time")
        for request in requests:  # each answered by the task version it was admitted with
            self.engine.bind(request)
        futures = [Future() for _ in requests]
        with self._cond:
            if self._stopped:
                raise QueueFullError(SHUTTING_DOWN)
            if len(self._items) + len(requests) > self.max_queue:
                raise QueueFullError(f"{len(self._items)} requests are waiting (the queue holds {self.max_queue}); "
                                     "retry later")
            self._items.extend(zip(requests, futures))
            queued = self._clock()
            for request in requests:
                request.queued = queued
            self._cond.notify()
        return futures

    async def run(self, requests: Sequence[Request]) -> list[Result]:
        """Submit and await the results (for an asyncio caller)."""
        futures = self.submit(requests)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def close(self, timeout: float = 30.0) -> None:
        """Stop: the requests waiting and running are cancelled (a decode stops at its next
        step), the worker is given at most `timeout` seconds to end, and every request not
        answered by then is answered with a shutting-down error. Returns even when the
        engine hangs (the worker is a daemon thread)."""
        with self._cond:
            self._stopped = True
            left, self._items = list(self._items), deque()
            running = list(self._running)
            self._cond.notify_all()
        for request, _ in left + running:
            request.cancelled.set()
        for request, future in left:
            if future.set_running_or_notify_cancel():
                self._settle(future, self._shut(request))
        self._worker.join(timeout)
        with self._cond:
            running = list(self._running)
        for request, future in running:
            self._settle(future, self._shut(request))

    # -- the worker -----------------------------------------------------------
    def _take(self) -> tuple[list[tuple[Request, Future]], float]:
        """What is waiting, after a short gathering window, up to four batches' worth; and
        the seconds that window took (from the first request there to the taking)."""
        limit = self.engine.max_batch_rows * 4  # the engine cuts this into budgeted batches
        with self._cond:
            while not self._items and not self._stopped:
                self._cond.wait()
            gathering = time.perf_counter()
            deadline = time.monotonic() + self.max_wait
            while len(self._items) < limit and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._running = list(taken)  # under the lock `close` takes: every request is waiting or running
        now = self._clock()
        for request, _ in taken:
            request.taken = now
        return taken, now - gathering

    def _live(self, items: list[tuple[Request, Future]]) -> list[tuple[Request, Future]]:
        """The taken requests to run: those whose future was not cancelled and whose client
        has not gone (answered here)."""
        live = []
        for request, future in items:
            try:
                if not future.set_running_or_notify_cancel():
                    continue
            except RuntimeError:  # answered by `close` already (the worker was slow to get here)
                continue
            if request.gone:
                self._settle(future, Result(request.task, error=GONE, error_kind=ErrorKind.CANCELLED))
                continue
            live.append((request, future))
        return live

    def _admit(self, room: int) -> list[tuple[Request, Callable[[Result], None]]]:
        """Called by the engine between decode steps: requests read by a task head that
        arrived meanwhile are answered (one mixed forward, so they do not wait for the
        decoding to end) when the time share lets them (`TimeShare`); up to `room`
        generation requests join the running batch. Whether a request generates is its
        bound task version's answer (`Engine.generates`)."""
        share = self.time_share
        share.decoded()
        with self._cond:  # one pass over the queue: this runs between any two decode steps
            heads, chosen = [], []
            for item in self._items:
                (chosen if self.engine.generates(item[0]) else heads).append(item)
            if heads and not share.heads_may_run(share.clock() - heads[0][0].queued):
                heads = []
            heads, chosen = heads[: self.engine.max_batch_rows], chosen[: max(room, 0)]
            for item in heads + chosen:
                self._items.remove(item)
            self._running += heads + chosen
        now = self._clock()
        for request, _ in heads + chosen:
            request.taken = now
        live = self._live(heads)
        if live:
            start, share_start = time.perf_counter(), share.clock()
            try:
                results = self.engine.run([r for r, _ in live])
            except Exception as e:  # the engine answers every request; this is a bug: not the decode's
                results = [Result(r.task, error=f"{type(e).__name__}: {e}", error_kind=ErrorKind.FAILED)
                           for r, _ in live]
            self._record(len(live), time.perf_counter() - start, results)
            now = self._clock()
            for (r, f), result in zip(live, results):
                r.answered = now
                self._settle(f, result)
            share.ran_heads(share.clock() - share_start)
        return [(request, self._resolver(request, future)) for request, future in self._live(chosen)]

    def _resolver(self, request: Request, future: Future) -> Callable[[Result], None]:
        def resolve(result: Result) -> None:
            self.stats.rows += 1
            self.stats.new_tokens += result.new_tokens
            request.answered = self._clock()
            self._settle(future, result)

        return resolve

    def _settle(self, future: Future, result: Result) -> None:
        """Answer a future once: a request cancelled by `close` is answered as shut down,
        and an answer that comes after `close` answered it is dropped."""
        if self._stopped and result.error_kind is ErrorKind.CANCELLED:
            result = self._shut(result)
        try:
            future.set_result(result)
        except InvalidStateError:
            pass

    @staticmethod
    def _shut(request: Request | Result) -> Result:
        return Result(request.task, error=SHUTTING_DOWN, error_kind=ErrorKind.SHUTTING_DOWN)

    def _record(self, rows: int, seconds: float, results: list[Result]) -> None:
        self.stats.runs += 1
        self.stats.rows += rows
        self.stats.busy_seconds += seconds
        self.stats.new_tokens += sum(r.new_tokens for r in results)
        for observe in self.stats.observers:
            observe(rows, seconds, results, None)

    def _answer(self, counted: list[bool], request: Request, future: Future, result: Result) -> None:
        """Resolve a request of a run once, its row (and the run, with its first answer)
        counted in the stats before its caller hears of it."""
        if future.done():
            return
        if not counted[0]:
            counted[0] = True
            self.stats.runs += 1
        self.stats.rows += 1
        self.stats.new_tokens += result.new_tokens
        request.answered = self._clock()
        self._settle(future, result)

    def _work(self) -> None:
        _name_os_thread(self._worker.name)
        while True:
            taken, gathered = self._take()
            if not taken:
                if self._stopped:
                    break
                continue
            live = self._live(taken)
            if not live:
                continue
            counted = [False]  # the run is counted with its first answer
            for request, future in live:
                # answered as soon as its result is ready: a run that decodes goes on while
                # new rows keep joining, and under steady load it would otherwise hold the
                # answers of the requests it began with (heads included) until the load
                # stops (seen as 8 s latencies in an 8 s load test)
                request.on_result = partial(self._answer, counted, request, future)
            start = time.perf_counter()
            self.time_share.start()
            try:
                results = self.engine.run([r for r, _ in live], admit=self._admit)
            except BaseException as e:  # the engine isolates request failures; this is a bug
                for _, f in live:
                    try:
                        f.set_exception(e)
                    except InvalidStateError:
                        pass
                continue
            finally:
                with self._cond:
                    self._running = []
            seconds = time.perf_counter() - start
            for (r, f), result in zip(live, results):
                self._answer(counted, r, f, result)
            self.stats.busy_seconds += seconds
            for observe in self.stats.observers:
                observe(len(live), seconds, results, gathered)
        with self._cond:  # shutting down: answer what is left
            left, self._items = list(self._items), deque()
        for request, future in left:
            if future.set_running_or_notify_cancel():
                self._settle(future, self._shut(request))


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the operating system too (Linux; cut to 15
    characters), as Python 3.14 does by itself: `top -H`, py-spy and the HTTP benchmark's
    per-thread CPU time (`bench.harness.server.thread_cpu`) then tell the engine's worker
    from the event loop and PyTorch's threads, which all carry the program's name."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:  # not Linux, or /proc read-only: the name is only a convenience
        pass


__all__ = ["Batcher", "QueueFullError", "TooManyRequestsForQueueError", "BatchStats", "TimeShare"]
