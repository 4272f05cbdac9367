"""What the routes of one server share: the `Server` (bank, engine, batcher, limits,
metrics) each route reads from ``request.app.state.server``, the error a route raises
(`APIError`, in OpenAI's body by `app.http_error`), the status code of each engine failure
(`STATUS`), and how a route waits for the engine while watching its client (`Server.run`,
`first_of`: a client that goes away cancels its requests)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from fastapi import HTTPException, Request as HTTPRequest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from ..errors import SoftPromptError
from .bank import PromptBank
from .entry import BankEntry, UnknownTaskError
from .batcher import Batcher, QueueFullError, TooManyRequestsForQueueError
from .engine import Engine
from .request import ErrorKind, Request, Result
from .handoff import Mailbox
from .text import GenerationOptions
from .timeline import STAGES, Timeline, follow

#: the status code of each way a request can fail in the engine
STATUS = {ErrorKind.UNKNOWN_TASK: 404, ErrorKind.INPUT_TOO_LONG: 413, ErrorKind.BAD_INPUT: 422,
          ErrorKind.FAILED: 500, ErrorKind.CANCELLED: 499, ErrorKind.SHUTTING_DOWN: 503}  # 499: client closed request

Input = Union[str, dict[str, Any]]


class APIError(HTTPException):
    """An error answer that names the request field at fault (`param`, e.g. ``temperature``)
    and, where OpenAI has one, its ``code`` (``model_not_found``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers=headers)
        self.param, self.code = param, code


class _Body(BaseModel):
    """A request body: a field the server does not know is refused, by name (a misspelt
    ``temprature`` would otherwise be dropped in silence)."""

    model_config = ConfigDict(extra="forbid")


class InputsBody(_Body):
    task: str
    inputs: list[Input] = Field(min_length=1)


#: buckets of the stage and gathering histograms: from 0.1 ms (a hand-off) to a long decode
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The server's Prometheus metrics (one registry per app).

    ``softprompt_request_stage_seconds{kind, stage}``: the seconds of each stage of every
    request that went through the engine (`timeline.STAGES`: parse, queue, engine,
    handoff, respond; kind: classify, tag, complete, chat, score), so that two scrapes
    give each stage's mean over the requests between them; ``softprompt_batch_gather_seconds``:
    per engine run, the batcher's gathering window before it (runs of head requests
    between two decode steps have none and are not counted there);
    ``softprompt_engine_phase_seconds{phase}``: the engine's host seconds so far in each
    phase of its runs (`engine.PHASES`), so that two scrapes say where the engine stage goes;
    ``softprompt_cuda_graphs{kind}``: the CUDA graphs recorded so far for head batches and
    joins (one per shape met: a capture costs a few forwards' time)."""

    def __init__(self, bank: PromptBank, batcher: Batcher):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("softprompt_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.latency = Histogram("softprompt_request_seconds", "HTTP request latency", ["endpoint"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_rows = Histogram("softprompt_batch_rows", "requests per engine run", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("softprompt_batch_seconds", "engine run time", registry=registry)
        self.batch_gather = Histogram("softprompt_batch_gather_seconds", "the batcher's gathering window before a run",
                                      registry=registry, buckets=STAGE_BUCKETS)
        self.stages = Histogram("softprompt_request_stage_seconds", "seconds of each stage of a request in the server",
                                ["kind", "stage"], registry=registry, buckets=STAGE_BUCKETS)
        self._stages_of: dict[str, list[Any]] = {}  # per kind, its stages' histograms (`labels` takes a lock)
        self.new_tokens = Counter("softprompt_generated_tokens", "tokens generated", registry=registry)
        Gauge("softprompt_queue_waiting", "requests waiting for the engine", registry=registry).set_function(
            lambda: batcher.waiting)
        Gauge("softprompt_tasks_loaded", "tasks in the prompt bank", registry=registry).set_function(lambda: len(bank))
        Gauge("softprompt_generated_tokens_per_second", "generated tokens per second of engine time",
              registry=registry).set_function(lambda: batcher.stats.new_tokens / max(batcher.stats.busy_seconds, 1e-9))
        self.streams_open = Gauge("softprompt_streams_open", "completion streams being sent", registry=registry)
        engine = batcher.engine
        if hasattr(engine, "heads"):  # CUDA graphs recorded so far (each a shape met the first time: a capture)
            graphs = Gauge("softprompt_cuda_graphs", "CUDA graphs recorded for head batches and joins",
                           ["kind"], registry=registry)
            graphs.labels("heads").set_function(lambda: len(engine.heads.graphs or ()))
            graphs.labels("joins").set_function(
                lambda: len((engine._decoder.prefill.graphs or ()) if engine._decoder is not None else ()))
        phases = getattr(engine, "phases", None)  # a tensor-parallel server's engine wraps one
        if phases is not None:
            clock = Gauge("softprompt_engine_phase_seconds", "host seconds of each phase of the engine's runs so far "
                          "(check, tokenize, prepare; for head requests launch and read)", ["phase"], registry=registry)
            for phase in phases:
                clock.labels(phase).set_function(lambda p=phase: phases[p])
        batcher.stats.observers.append(self.observe_run)

    def observe_run(self, rows: int, seconds: float, results: list[Result], gathered: float | None = None) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        if gathered is not None:
            self.batch_gather.observe(gathered)
        self.new_tokens.inc(sum(r.new_tokens for r in results))

    def observe_timeline(self, timeline: Timeline, end: float) -> None:
        """A request's stages, if it went through them all (`Timeline.stages`)."""
        stages = timeline.stages(end)
        if stages is None:
            return
        children = self._stages_of.get(timeline.kind)
        if children is None:
            children = self._stages_of[timeline.kind] = [self.stages.labels(timeline.kind, s) for s in STAGES]
        for child, seconds in zip(children, stages):
            child.observe(seconds)


@dataclass
class Server:
    """What the routes of one app share."""

    bank: PromptBank
    engine: Engine
    batcher: Batcher
    metrics: Metrics
    max_inputs: int
    max_new_tokens: int
    prompt_root: Path | str | None  # a local folder, or an fsspec URL (`io.remote`)
    stream_interval: int = 1  # a stream's pieces per write after its first (`serve --stream-interval`)
    _mailbox: Mailbox | None = field(default=None, init=False, repr=False)

    @property
    def mailbox(self) -> Mailbox:
        """The engine thread's hand-off to the running event loop (`handoff.Mailbox`): one
        per loop (a test client may run the app on more than one in turn)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def submit(self, requests: list[Request]) -> list[asyncio.Future]:
        """Queue a request's engine requests; their results, to await."""
        try:
            mailbox = self.mailbox
            return [mailbox.future(f) for f in self.batcher.submit(requests)]
        except QueueFullError as e:
            raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except TooManyRequestsForQueueError as e:  # refused for ever: "retry later" would be no answer
            raise HTTPException(413, str(e)) from None

    async def run(self, requests: list[Request], http: HTTPRequest, kind: str) -> list[Result]:
        """The requests' results, or, if the client goes away first, none: they are
        cancelled (and the answer, which no one reads, is 499). `kind`: what the request
        is, for its stages' metrics (`timeline`)."""
        timeline = follow(http.scope, kind, requests)
        results = asyncio.gather(*self.submit(requests))
        await first_of({results}, http, requests)
        if timeline is not None:
            timeline.deliver()
        return results.result()

    async def entry_for(self, task: str, endpoint: str) -> BankEntry:
        """The task's entry, if `endpoint` answers for it (`Task.endpoint`; a folder without a
        task head is for completions). A task registered but not in memory is read from its
        folder in a worker thread: the event loop serves other requests meanwhile."""
        param = "model" if endpoint == "completions" else "task"
        try:
            entry = self.bank[task] if self.bank.in_memory(task) else await asyncio.to_thread(self.bank.__getitem__,
                                                                                            task)
        except UnknownTaskError as e:
            raise APIError(404, str(e), param, "model_not_found") from None
        except SoftPromptError as e:  # its folder, registered at start-up, cannot be read now
            raise APIError(500, f"task {task!r} cannot be loaded: {e}", param, "task_unavailable") from None
        serves = entry.task.endpoint if entry.task is not None else "completions"
        if endpoint == "tag" and serves != "tag":
            raise APIError(422, f"task {task!r} is not a token-classification task: use /v1/classify", param)
        if endpoint == "classify" and serves != "classify":
            raise APIError(422, f"task {task!r} has no classification head: use /v1/{serves}", param)
        return entry

    def options(self, max_tokens: int, body: Any, max_param: str = "max_tokens",
                logprobs: int | None = None) -> GenerationOptions:
        """A completion's options from its body (`max_tokens`: its token budget, named
        `max_param`; `logprobs`: the top log-probabilities per token, None: none), every one
        checked here, before the request joins a batch."""
        if max_tokens > self.max_new_tokens:
            raise APIError(400, f"{max_param}: {max_tokens} is over the server's limit of {self.max_new_tokens}",
                           max_param)
        try:
            options = GenerationOptions.completion(
                max_tokens, body.temperature, body.top_p, body.stop, body.seed, logprobs,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logit_bias=body.logit_bias)
            options.check_vocabulary(self.bank.vocabulary_size)
            return options
        except SoftPromptError as e:  # "generation option temperature: ..." names the field
            named = re.match(r"generation options? (\w+)", str(e))
            raise APIError(400, str(e), named.group(1) if named else None) from None

    def check_count(self, n: int, what: str, param: str) -> None:
        if n > self.max_inputs:
            raise APIError(413, f"{n} {what} in one request; the server takes at most {self.max_inputs}", param)


def server_of(request: HTTPRequest) -> Server:
    return request.app.state.server


def drop(future: asyncio.Future) -> None:
    """Cancel a future no one will read. (A cancelled `gather` holds the CancelledError as
    its exception, which asyncio logs as never retrieved unless someone takes it.)"""
    future.cancel()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


def cancel(requests: list[Request]) -> None:
    """Stop the requests in the engine: dropped if waiting, ended at the next decode step."""
    for r in requests:
        r.cancelled.set()
        if r.stream is not None:
            r.stream.cancel()


async def first_of(futures: set[asyncio.Future], http: HTTPRequest, requests: list[Request]) -> None:
    """Wait until one of `futures` is done, unless the client goes away first (or this
    task is cancelled, as uvicorn does to requests still running when its shutdown's drain
    time is up): then `requests` are cancelled in the engine, `futures` too, and
    HTTPException 499 is raised (for the metrics: no one reads it).

    The body has been read by now, so the next ASGI message is the client's disconnect;
    waiting for it costs nothing while the client stays."""
    async def gone() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    left = True
    try:
        await asyncio.wait({*futures, watch}, return_when=asyncio.FIRST_COMPLETED)
        left = not any(f.done() for f in futures)
    finally:
        watch.cancel()
        if left:
            cancel(requests)
            for f in futures:
                drop(f)
    if left:
        raise HTTPException(499, "the client closed the connection before the answer was ready")


def check_results(results: list[Result | None], what: str = "input", param: str = "inputs") -> None:
    """The status of the first failed result (None: not answered yet); `param` names the
    list of the request the results answer (``inputs[3]``)."""
    for i, r in enumerate(results):
        if r is not None and not r.ok:
            raise APIError(STATUS[r.error_kind], f"{what} {i}: {r.error}", f"{param}[{i}]")


