"""The HTTP server: a thin FastAPI layer over the batcher and the engine.

    POST /v1/classify       {"task": ..., "inputs": [...]}     -> labels and scores
    POST /v1/tag            {"task": ..., "inputs": [...]}     -> tags and entities per input
    POST /v1/completions    OpenAI-compatible; "model" names the task; "stream": server-sent events
    GET  /v1/models         the loaded tasks
    PUT  /v1/prompts/{task} {"path": ...}   load or replace a prompt (admin, off unless enabled)
    DELETE /v1/prompts/{task}               unload it (admin)
    GET  /health, GET /metrics (Prometheus text format)

Errors: 404 unknown task (lists the loaded ones), 422 malformed body or bad input (names
the field or the input), 413 body or input too long, 429 queue full, 401 missing or wrong
API key (when one is set), 403 admin endpoints while admin is off. The engine says why a
request failed (`ErrorKind`); `STATUS` is the one table of their status codes.

The routes are module-level functions; each reads the server it runs in (`Server`: bank,
engine, batcher, limits, metrics) from ``request.app.state.server``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Union

from fastapi import FastAPI, HTTPException, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, field_validator

from ..errors import SoftPromptError
from .bank import BankEntry, PromptBank, UnknownTaskError, check_task_name
from .batcher import Batcher, QueueFullError, TooManyRequestsForQueueError
from .engine import Engine, ErrorKind, Request, Result
from .guard import RequestGuard
from .text import GenerationOptions, TokenStream

#: the status code of each way a request can fail in the engine
STATUS = {ErrorKind.UNKNOWN_TASK: 404, ErrorKind.INPUT_TOO_LONG: 413, ErrorKind.BAD_INPUT: 422,
          ErrorKind.FAILED: 500, ErrorKind.CANCELLED: 499, ErrorKind.SHUTTING_DOWN: 503}  # 499: client closed request

Input = Union[str, dict[str, Any]]


class InputsBody(BaseModel):
    task: str
    inputs: list[Input] = Field(min_length=1)


class CompletionBody(BaseModel):
    model: str
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: Union[int, None] = None
    n: int = 1
    user: Union[str, None] = None

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n


class PromptBody(BaseModel):
    path: str


class Metrics:
    """The server's Prometheus metrics (one registry per app)."""

    def __init__(self, bank: PromptBank, batcher: Batcher):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("softprompt_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.latency = Histogram("softprompt_request_seconds", "HTTP request latency", ["endpoint"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_rows = Histogram("softprompt_batch_rows", "requests per engine run", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("softprompt_batch_seconds", "engine run time", registry=registry)
        self.new_tokens = Counter("softprompt_generated_tokens", "tokens generated", registry=registry)
        Gauge("softprompt_queue_waiting", "requests waiting for the engine", registry=registry).set_function(
            lambda: batcher.waiting)
        Gauge("softprompt_tasks_loaded", "tasks in the prompt bank", registry=registry).set_function(lambda: len(bank))
        Gauge("softprompt_generated_tokens_per_second", "generated tokens per second of engine time",
              registry=registry).set_function(lambda: batcher.stats.new_tokens / max(batcher.stats.busy_seconds, 1e-9))
        self.streams_open = Gauge("softprompt_streams_open", "completion streams being sent", registry=registry)
        batcher.stats.observers.append(self.observe_run)

    def observe_run(self, rows: int, seconds: float, results: list[Result]) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        self.new_tokens.inc(sum(r.new_tokens for r in results))


@dataclass
class Server:
    """What the routes of one app share."""

    bank: PromptBank
    engine: Engine
    batcher: Batcher
    metrics: Metrics
    max_inputs: int
    max_new_tokens: int
    prompt_root: Path | None

    async def run(self, requests: list[Request]) -> list[Result]:
        try:
            return await self.batcher.run(requests)
        except QueueFullError as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None
        except TooManyRequestsForQueueError as e:
            raise HTTPException(413, str(e)) from None

    def entry_for(self, task: str, endpoint: str) -> BankEntry:
        """The task's entry, if `endpoint` answers for it (`Task.endpoint`; a folder without a
        task head is for completions)."""
        try:
            entry = self.bank[task]
        except UnknownTaskError as e:
            raise HTTPException(404, str(e)) from None
        serves = entry.task.endpoint if entry.task is not None else "completions"
        if endpoint == "tag" and serves != "tag":
            raise HTTPException(422, f"task {task!r} is not a token-classification task: use /v1/classify")
        if endpoint == "classify" and serves != "classify":
            raise HTTPException(422, f"task {task!r} has no classification head: use /v1/{serves}")
        return entry

    def check_count(self, n: int, what: str) -> None:
        if n > self.max_inputs:
            raise HTTPException(413, f"{n} {what} in one request; the server takes at most {self.max_inputs}")


def server_of(request: HTTPRequest) -> Server:
    return request.app.state.server


def check_results(results: list[Result], what: str = "input") -> None:
    for i, r in enumerate(results):
        if not r.ok:
            raise HTTPException(STATUS[r.error_kind], f"{what} {i}: {r.error}")


# -- routes (registered by `create_app` from ROUTES) -----------------------------------
def health(request: HTTPRequest) -> dict[str, Any]:
    return {"status": "ok", "tasks": len(server_of(request).bank)}


def metrics(request: HTTPRequest) -> PlainTextResponse:
    text = generate_latest(server_of(request).metrics.registry).decode()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def models(request: HTTPRequest) -> dict[str, Any]:
    bank = server_of(request).bank
    data = []
    for name in bank.names():
        e = bank[name]
        data.append({"id": name, "object": "model", "owned_by": "softprompt", "method": e.model.config.method,
                     "kind": "deep" if e.deep else "input", "num_virtual_tokens": e.num_virtual_tokens,
                     "template": e.model.template.source, "task": e.task.kind if e.task is not None else None})
    return {"object": "list", "data": data}


async def classify(body: InputsBody, request: HTTPRequest) -> dict[str, Any]:
    server = server_of(request)
    server.entry_for(body.task, "classify")
    server.check_count(len(body.inputs), "inputs")
    results = await server.run([Request(body.task, x) for x in body.inputs])
    check_results(results)
    return {"task": body.task, "results": [r.output for r in results]}


async def tag(body: InputsBody, request: HTTPRequest) -> dict[str, Any]:
    from seqeval.metrics.sequence_labeling import get_entities  # seqeval loads only when tagging

    server = server_of(request)
    field = server.entry_for(body.task, "tag").task.word_field
    server.check_count(len(body.inputs), "inputs")
    results = await server.run([Request(body.task, x) for x in body.inputs])
    check_results(results)
    out = []
    for x, r in zip(body.inputs, results):
        words = x.split() if isinstance(x, str) else list(x.get(field, []))
        entities = [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s : e + 1])}
                    for t, s, e in get_entities(list(r.output))]
        out.append({"tokens": words, "tags": r.output, "entities": entities})
    return {"task": body.task, "results": out}


async def completions(body: CompletionBody, request: HTTPRequest):
    server = server_of(request)
    server.entry_for(body.model, "completions")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    server.check_count(len(prompts), "prompts")
    if not prompts:
        raise HTTPException(422, "prompt: give at least one prompt")
    if body.max_tokens > server.max_new_tokens:
        raise HTTPException(422, f"max_tokens: {body.max_tokens} is over the server's limit of {server.max_new_tokens}")
    try:  # every sampling option checked here, before the request joins a batch
        options = GenerationOptions.completion(body.max_tokens, body.temperature, body.top_p, body.stop, body.seed)
    except SoftPromptError as e:
        raise HTTPException(422, str(e)) from None
    completion = _Completion(body.model, f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()))
    if body.stream:
        return completion.stream(server, prompts, options)
    results = await server.run([Request(body.model, p, generate=True, options=options) for p in prompts])
    check_results(results, "prompt")
    return completion.answer(results)


@dataclass
class _Completion:
    """One completion request's answer: whole (a JSON body) or streamed (server-sent events)."""

    model: str
    ident: str
    created: int

    def answer(self, results: list[Result]) -> dict[str, Any]:
        choices = [{"index": i, "text": r.output, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.new_tokens for r in results)
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}

    def chunk(self, i: int, text: str, finish: str | None) -> str:
        payload = {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    def stream(self, server: Server, prompts: list[str], options: GenerationOptions) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        streams = [TokenStream(lambda text, i=i: loop.call_soon_threadsafe(pieces.put_nowait, (i, text)))
                   for i in range(len(prompts))]
        try:
            futures = server.batcher.submit([Request(self.model, p, generate=True, options=options, stream=s)
                                             for p, s in zip(prompts, streams)])
        except QueueFullError as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None
        done = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return StreamingResponse(self._events(server.metrics, pieces, done, streams), media_type="text/event-stream")

    async def _events(self, metrics: Metrics, pieces: asyncio.Queue, done: asyncio.Future,
                      streams: list[TokenStream]) -> AsyncIterator[str]:
        """Each piece as it comes, then each prompt's finish (or error), then ``[DONE]``."""
        metrics.streams_open.inc()
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                i, text = getter.result()
                yield self.chunk(i, text, None)
            while not pieces.empty():
                i, text = pieces.get_nowait()
                yield self.chunk(i, text, None)
            for i, r in enumerate(done.result()):
                if not r.ok:
                    yield f"data: {json.dumps({'error': {'message': r.error, 'status': STATUS[r.error_kind]}})}\n\n"
                else:
                    yield self.chunk(i, "", r.finish_reason)
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away: its rows stop at the next step
            if getter is not None:
                getter.cancel()  # else asyncio warns of a pending task when the client left mid-wait
            for s in streams:
                s.cancel()
            metrics.streams_open.dec()


# -- admin ----------------------------------------------------------------------------
async def load_prompt(task: str, body: PromptBody, request: HTTPRequest):
    server = server_of(request)
    try:
        check_task_name(task)
    except SoftPromptError as e:
        raise HTTPException(422, str(e)) from None
    path = Path(body.path).expanduser().resolve()
    root = server.prompt_root
    if root is not None and root not in path.parents and path != root:
        raise HTTPException(403, f"path {body.path!r} is outside the prompt root {root}")
    replaced = task in server.bank
    try:
        await asyncio.to_thread(server.bank.add, task, path, replace=True)
    except SoftPromptError as e:
        raise HTTPException(422, f"{body.path}: {e}") from None
    return {"task": task, "status": "replaced" if replaced else "loaded"}


def unload_prompt(task: str, request: HTTPRequest):
    try:
        server_of(request).bank.remove(task)
    except UnknownTaskError as e:
        raise HTTPException(404, str(e)) from None
    return {"task": task, "status": "removed"}


def admin_off(task: str):
    """Without --admin the routes take no body at all, so the answer is 403 whatever is sent
    (a route with a body model would parse, and answer 422 on, a body it then refuses)."""
    raise HTTPException(403, "admin endpoints are off: start the server with --admin to load and unload prompts")


#: (methods, path, route function): the server's routes, then the admin routes (or their refusal)
ROUTES = [(["GET"], "/health", health), (["GET"], "/metrics", metrics), (["GET"], "/v1/models", models),
          (["POST"], "/v1/classify", classify), (["POST"], "/v1/tag", tag), (["POST"], "/v1/completions", completions)]
ADMIN_ROUTES = [(["PUT"], "/v1/prompts/{task}", load_prompt), (["DELETE"], "/v1/prompts/{task}", unload_prompt)]
ADMIN_OFF_ROUTES = [(["PUT", "DELETE"], "/v1/prompts/{task}", admin_off)]


async def count_requests(request: HTTPRequest, call_next):
    """Count and time every request by its route (``other`` for no route)."""
    start = time.perf_counter()
    response = await call_next(request)
    endpoint = request.scope.get("route").path if request.scope.get("route") else "other"
    metrics = server_of(request).metrics
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batcher's worker stops with the server."""
    yield
    app.state.batcher.close()


def create_app(bank: PromptBank, *, engine: Engine | None = None, max_queue: int = 1024, max_wait: float = 0.005,
               admin: bool = False, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_inputs: int = 256, max_new_tokens: int = 1024, prompt_root: str | Path | None = None) -> FastAPI:
    """The server's application.

    Args:
        bank: the loaded tasks.
        engine: the engine (default: `Engine(bank)`).
        max_queue / max_wait: the batcher's queue bound and gathering window.
        admin: enable PUT / DELETE /v1/prompts.
        api_key: required on every path, /docs and unknown ones included (``Authorization:
            Bearer KEY`` or ``X-API-Key: KEY``), when set.
        max_body_bytes: larger request bodies get 413 (chunked bodies are counted as they arrive).
        max_inputs: most inputs (or prompts) in one request.
        max_new_tokens: most tokens one completion may ask for.
        prompt_root: admin loads only folders under it (default: anywhere the server can read).
    """
    engine = engine or Engine(bank)
    batcher = Batcher(engine, max_queue=max_queue, max_wait=max_wait)
    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.bank, app.state.engine, app.state.batcher = bank, engine, batcher
    app.state.server = Server(bank, engine, batcher, Metrics(bank, batcher), max_inputs, max_new_tokens,
                              Path(prompt_root).resolve() if prompt_root else None)
    # added first, so it runs inside the metrics middleware: refused requests are counted too
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.middleware("http")(count_requests)
    for methods, path, route in ROUTES + (ADMIN_ROUTES if admin else ADMIN_OFF_ROUTES):
        app.add_api_route(path, route, methods=methods)
    return app


__all__ = ["create_app", "STATUS"]
