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
API key (when one is set), 403 admin endpoints while admin is off.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI, HTTPException, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from ..errors import SoftPromptError
from ..tasks import Generation, TokenClassification
from .bank import PromptBank, UnknownTaskError, check_task_name
from .batcher import Batcher, QueueFullError
from .engine import Engine, Request, Result, TokenStream
from .guard import RequestGuard

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
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    engine = engine or Engine(bank)
    batcher = Batcher(engine, max_queue=max_queue, max_wait=max_wait)
    registry = CollectorRegistry()
    requests_total = Counter("softprompt_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("softprompt_request_seconds", "HTTP request latency", ["endpoint"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    batch_rows = Histogram("softprompt_batch_rows", "requests per engine run", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    batch_seconds = Histogram("softprompt_batch_seconds", "engine run time", registry=registry)
    new_tokens = Counter("softprompt_generated_tokens", "tokens generated", registry=registry)
    Gauge("softprompt_queue_waiting", "requests waiting for the engine", registry=registry).set_function(
        lambda: batcher.waiting)
    Gauge("softprompt_tasks_loaded", "tasks in the prompt bank", registry=registry).set_function(lambda: len(bank))
    Gauge("softprompt_generated_tokens_per_second", "generated tokens per second of engine time",
          registry=registry).set_function(lambda: batcher.stats.new_tokens / max(batcher.stats.busy_seconds, 1e-9))
    streams_open = Gauge("softprompt_streams_open", "completion streams being sent", registry=registry)

    def observe(rows: int, seconds: float, results: list[Result]) -> None:
        batch_rows.observe(rows)
        batch_seconds.observe(seconds)
        new_tokens.inc(sum(r.new_tokens for r in results))

    batcher.stats.observers.append(observe)
    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.bank, app.state.engine, app.state.batcher = bank, engine, batcher
    root = Path(prompt_root).resolve() if prompt_root else None
    # added first, so it runs inside the metrics middleware: refused requests are counted too
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.middleware("http")
    async def _limits_and_metrics(request: HTTPRequest, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("route").path if request.scope.get("route") else "other"
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    async def run(requests: list[Request]) -> list[Result]:
        try:
            return await batcher.run(requests)
        except QueueFullError as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None

    def entry_for(task: str, endpoint: str):
        try:
            entry = bank[task]
        except UnknownTaskError as e:
            raise HTTPException(404, str(e)) from None
        is_tagger = isinstance(entry.task, TokenClassification)
        if endpoint == "tag" and not is_tagger:
            raise HTTPException(422, f"task {task!r} is not a token-classification task: use /v1/classify")
        if endpoint == "classify" and (is_tagger or isinstance(entry.task, Generation) or entry.task is None):
            use = "/v1/tag" if is_tagger else "/v1/completions"
            raise HTTPException(422, f"task {task!r} has no classification head: use {use}")
        return entry

    def check_results(results: list[Result], what: str = "input") -> None:
        for i, r in enumerate(results):
            if not r.ok:
                raise HTTPException(r.status, f"{what} {i}: {r.error}")

    def check_count(n: int, what: str) -> None:
        if n > max_inputs:
            raise HTTPException(413, f"{n} {what} in one request; the server takes at most {max_inputs}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(bank)}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = []
        for name in bank.names():
            e = bank[name]
            data.append({"id": name, "object": "model", "owned_by": "softprompt", "method": e.model.config.method,
                         "kind": "deep" if e.deep else "input", "num_virtual_tokens": e.num_virtual_tokens,
                         "template": e.model.template.source, "task": e.task.kind if e.task is not None else None})
        return {"object": "list", "data": data}

    @app.post("/v1/classify")
    async def classify(body: InputsBody) -> dict[str, Any]:
        entry_for(body.task, "classify")
        check_count(len(body.inputs), "inputs")
        results = await run([Request(body.task, x) for x in body.inputs])
        check_results(results)
        return {"task": body.task, "results": [r.output for r in results]}

    @app.post("/v1/tag")
    async def tag(body: InputsBody) -> dict[str, Any]:
        from seqeval.metrics.sequence_labeling import get_entities

        entry = entry_for(body.task, "tag")
        check_count(len(body.inputs), "inputs")
        results = await run([Request(body.task, x) for x in body.inputs])
        check_results(results)
        field = entry.task.field
        out = []
        for x, r in zip(body.inputs, results):
            words = x.split() if isinstance(x, str) else list(x.get(field, []))
            entities = [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s : e + 1])}
                        for t, s, e in get_entities(list(r.output))]
            out.append({"tokens": words, "tags": r.output, "entities": entities})
        return {"task": body.task, "results": out}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        entry_for(body.model, "completions")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        check_count(len(prompts), "prompts")
        if not prompts:
            raise HTTPException(422, "prompt: give at least one prompt")
        if body.max_tokens > max_new_tokens:
            raise HTTPException(422, f"max_tokens: {body.max_tokens} is over the server's limit of {max_new_tokens}")
        options: dict[str, Any] = {"max_new_tokens": body.max_tokens, "temperature": body.temperature,
                                   "top_p": body.top_p, "stop": body.stop}
        if body.seed is not None:
            options["seed"] = body.seed
        if body.temperature == 0 or body.top_p == 1.0:
            options.pop("top_p")
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
        if not body.stream:
            results = await run([Request(body.model, p, generate=True, options=options) for p in prompts])
            check_results(results, "prompt")
            choices = [{"index": i, "text": r.output, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
            prompt_tokens = sum(r.prompt_tokens for r in results)
            completion_tokens = sum(r.new_tokens for r in results)
            return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                  "total_tokens": prompt_tokens + completion_tokens}}
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        streams = []
        for i in range(len(prompts)):
            streams.append(TokenStream(lambda text, i=i: loop.call_soon_threadsafe(pieces.put_nowait, (i, text))))
        try:
            futures = batcher.submit([Request(body.model, p, generate=True, options=options, stream=s)
                                      for p, s in zip(prompts, streams)])
        except QueueFullError as e:
            raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None
        done = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

        def chunk(i: int, text: str, finish: str | None) -> str:
            payload = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                       "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            streams_open.inc()
            getter = None
            try:
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        i, text = getter.result()
                        yield chunk(i, text, None)
                        continue
                    getter.cancel()
                    break
                while not pieces.empty():
                    i, text = pieces.get_nowait()
                    yield chunk(i, text, None)
                results = done.result()
                for i, r in enumerate(results):
                    if not r.ok:
                        yield f"data: {json.dumps({'error': {'message': r.error, 'status': r.status}})}\n\n"
                    else:
                        yield chunk(i, "", r.finish_reason)
                yield "data: [DONE]\n\n"
            finally:  # also when the client goes away: its rows stop at the next step
                if getter is not None:
                    getter.cancel()  # else asyncio warns of a pending task when the client left mid-wait
                for s in streams:
                    s.cancel()
                streams_open.dec()

        return StreamingResponse(events(), media_type="text/event-stream")

    if not admin:
        # Without --admin the routes take no body at all, so the answer is 403 whatever is sent
        # (a route with a body model would parse, and answer 422 on, a body it then refuses).
        @app.api_route("/v1/prompts/{task}", methods=["PUT", "DELETE"])
        def admin_off(task: str):
            raise HTTPException(403, "admin endpoints are off: start the server with --admin to load and unload prompts")

        return app

    @app.put("/v1/prompts/{task}")
    async def load_prompt(task: str, body: PromptBody):
        try:
            check_task_name(task)
        except SoftPromptError as e:
            raise HTTPException(422, str(e)) from None
        path = Path(body.path).expanduser().resolve()
        if root is not None and root not in path.parents and path != root:
            raise HTTPException(403, f"path {body.path!r} is outside the prompt root {root}")
        replaced = task in bank
        try:
            await asyncio.to_thread(bank.add, task, path, replace=True)
        except SoftPromptError as e:
            raise HTTPException(422, f"{body.path}: {e}") from None
        return {"task": task, "status": "replaced" if replaced else "loaded"}

    @app.delete("/v1/prompts/{task}")
    def unload_prompt(task: str):
        try:
            bank.remove(task)
        except UnknownTaskError as e:
            raise HTTPException(404, str(e)) from None
        return {"task": task, "status": "removed"}

    return app


__all__ = ["create_app"]
