"""The HTTP server: a thin FastAPI layer over the batcher and the engine.

    POST /v1/classify       {"task": ..., "inputs": [...]}     -> labels and scores
    POST /v1/tag            {"task": ..., "inputs": [...]}     -> tags and entities per input
    POST /v1/completions    OpenAI-compatible; "model" names the task; "stream": server-sent events
    POST /v1/chat/completions  OpenAI-compatible chat: the messages, rendered by the tokenizer's
                            chat template, complete as that prompt would (`chat.render_chat`)
    GET  /v1/models         the loaded tasks, and the base model served alone under its own
                            name (`PromptBank.add_base`: kind "base", for completions and chat)
    PUT  /v1/prompts/{task} {"path": ...}   load or replace a prompt (admin, off unless enabled)
    DELETE /v1/prompts/{task}               unload it (admin)
    POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...}, POST /v1/unload_lora_adapter
                            {"lora_name": ...}: vLLM's runtime adapter routes, aliases of the two above
    GET  /tokenizer_info, POST /tokenize, POST /detokenize: the base's tokenizer, in vLLM's
                            shapes (`tokenizer_api`; lm-eval's remote tokenizer backend)
    GET  /health, GET /metrics (Prometheus text format)

Errors, every one in OpenAI's body (`errors.error_body`: ``{"error": {"message", "type",
"param", "code"}}``, ``param`` the field at fault): 400 a body that fails its schema (a
field missing, of the wrong type or out of range, an unknown field, an OpenAI field
softprompt does not implement: `UNIMPLEMENTED`), a completion option out of range, or a
body that is not standard JSON (``NaN``, ``Infinity``: `guard.parse_json_body`); 404
unknown task (lists the loaded ones; code ``model_not_found``); 422 a well-formed request
the task cannot answer (an input it cannot read, the wrong endpoint for the task, a
folder admin cannot load, text with a lone surrogate); 413 body or input too long (or
more inputs than the queue holds); 429 queue full; 401 missing or wrong API key (when one
is set); 403 admin endpoints while admin is off; 409 an admin change to the base model's
own name (the base is not a prompt). Validation answers 400, not FastAPI's
422, because OpenAI does and its client raises BadRequestError for it. The engine says
why a request failed (`ErrorKind`); `STATUS` is the one table of their status codes. A
streamed completion that fails before its first piece gets the status a whole one would,
not a stream with an error in it; a prompt that fails later ends its stream with
``data: {"error": {...}}``.

A request whose client goes away is cancelled: its engine requests are marked
(`Request.cancelled`) and stop at the next decode step, whether the route was waiting for
whole answers (`Server.run` watches the connection) or streaming them.

The routes are module-level functions; each reads the server it runs in (`Server`: bank,
engine, batcher, limits, metrics) from ``request.app.state.server``. This module holds the
app, its middleware, its error answers and the task routes (classify, tag, models); the
completion routes are in `openai_api`, the admin routes in `admin`, what they share in
`server`.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError
from ..extras import MissingExtraError, require
from ..io.remote import is_url
from .admin import ADMIN_OFF_ROUTES, ADMIN_ROUTES
from .bank import PromptBank
from .batcher import Batcher, TimeShare
from .engine import Engine
from .request import Request
from .errors import error_body, field_path
from .guard import BodyError, RequestGuard, check_api_key, parse_json_body
from .openai_api import chat_completions, completions
from .server import STATUS, APIError, InputsBody, Metrics, Server, check_results, server_of
from .timeline import begin
from .tokenizer_api import TOKENIZER_ROUTES


# -- routes (registered by `create_app` from ROUTES) -----------------------------------
# A route that never blocks is `async def`: FastAPI runs a plain `def` route in a worker
# thread, a hop that cost 0.2 ms of the event loop's time per /health (measured).
async def health(request: HTTPRequest) -> dict[str, Any]:
    return {"status": "ok", "tasks": len(server_of(request).bank)}


async def metrics(request: HTTPRequest) -> PlainTextResponse:
    text = generate_latest(server_of(request).metrics.registry).decode()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def models(request: HTTPRequest) -> dict[str, Any]:
    bank = server_of(request).bank
    data = []
    for name in bank.names():  # described without reading the folders of tasks not in memory
        data.append({"id": name, "object": "model", "owned_by": "softprompt", **bank.describe(name)})
    return {"object": "list", "data": data}


async def classify(body: InputsBody, request: HTTPRequest) -> dict[str, Any]:
    server = server_of(request)
    entry = await server.entry_for(body.task, "classify")  # the version checked is the version that answers
    server.check_count(len(body.inputs), "inputs", "inputs")
    results = await server.run([Request(body.task, x, entry=entry) for x in body.inputs], request, "classify")
    check_results(results)
    return {"task": body.task, "results": [r.output for r in results]}


async def tag(body: InputsBody, request: HTTPRequest) -> dict[str, Any]:
    try:
        get_entities = require("seqeval.metrics.sequence_labeling", "ner",
                               "a tagging answer's entity spans").get_entities
    except MissingExtraError as e:  # the server's install, not the request: said as it is, not as "internal error"
        raise APIError(500, f"{e} (on the server)", code="missing_extra") from None

    server = server_of(request)
    entry = await server.entry_for(body.task, "tag")
    field = entry.task.word_field
    server.check_count(len(body.inputs), "inputs", "inputs")
    results = await server.run([Request(body.task, x, entry=entry) for x in body.inputs], request, "tag")
    check_results(results)
    out = []
    for x, r in zip(body.inputs, results):
        words = x.split() if isinstance(x, str) else list(x.get(field, []))
        entities = [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s : e + 1])}
                    for t, s, e in get_entities(list(r.output))]
        out.append({"tokens": words, "tags": r.output, "entities": entities})
    return {"task": body.task, "results": out}


#: (methods, path, route function): the server's routes, then the admin routes (or their refusal)
ROUTES = [(["GET"], "/health", health), (["GET"], "/metrics", metrics), (["GET"], "/v1/models", models),
          (["POST"], "/v1/classify", classify), (["POST"], "/v1/tag", tag), (["POST"], "/v1/completions", completions),
          (["POST"], "/v1/chat/completions", chat_completions)]


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route (``other`` for no
    route), to the end of its answer (a stream's last chunk), and the stages of those that
    went through the engine (`timeline`: begun here, followed by the route). A plain ASGI
    class, not Starlette's ``BaseHTTPMiddleware``: that one runs each request in a task
    group with memory streams between them, which cost more than the whole of a /health
    answer."""

    def __init__(self, app, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # what an exception out of the app becomes
        timeline = begin(scope, start)

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router on the shared scope
            endpoint = route.path if route is not None else "other"
            end = time.perf_counter()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(end - start)
            self.metrics.observe_timeline(timeline, end)


class _StrictRequest(HTTPRequest):
    """A request whose JSON body is parsed by `parse_json_body` (finite numbers, valid
    Unicode; the problem named with its field)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json_body(await self.body())
            except BodyError as e:
                raise APIError(e.status, str(e), e.param) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Every route's body goes through `_StrictRequest` (FastAPI's documented way to
    change how a route reads its request): one parser for all of them."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def strict(request: HTTPRequest):
            return await handle(_StrictRequest(request.scope, request.receive))

        return strict


# -- errors: every one in OpenAI's body (`errors.error_body`) ----------------------------------
def http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
    """A route's refusal (`APIError`, FastAPI's or Starlette's own: 404 no such path, 405)."""
    body = error_body(e.status_code, str(e.detail), getattr(e, "param", None), getattr(e, "code", None))
    return JSONResponse(body, e.status_code, headers=getattr(e, "headers", None))


def _validation_message(error: dict[str, Any]) -> tuple[str | None, str]:
    """(param, message) of one pydantic error: the field by its path and what is wrong with
    it (an unknown field: the fields the body takes)."""
    loc = [p for p in error.get("loc", ()) if not (isinstance(p, str) and p in _UNION_TAGS)]
    param = field_path(loc)
    if error.get("type") == "json_invalid":
        return None, f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    if error.get("type") == "extra_forbidden":
        owner = field_path(loc[:-1]) or "this request"
        return param, f"{param}: unknown field ({owner} takes {', '.join(error['known'])})"
    return param, f"{param or 'body'}: {error.get('msg')}"


#: the names pydantic puts in a location for the member of a union it tried
_UNION_TAGS = {"str", "list[str]", "dict[str,any]", "int", "float", "bool"}


def validation_error(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    """A body that fails its model: 400, as OpenAI answers a bad parameter (and the official
    client raises BadRequestError for; 422 would be its UnprocessableEntityError), naming
    the first field at fault."""
    route = request.scope.get("route")
    first = dict(e.errors()[0]) if e.errors() else {"loc": (), "msg": "invalid body"}
    if first.get("type") == "extra_forbidden":
        first["known"] = _known_fields(route, [p for p in first.get("loc", ())[1:-1] if isinstance(p, str)])
    param, message = _validation_message(first)
    return JSONResponse(error_body(400, message, param), 400)


def _known_fields(route: Any, path: list[str]) -> list[str]:
    """The fields of the body a route takes, or of the object at `path` in it (for the
    message that refuses an unknown one)."""
    field = getattr(route, "body_field", None)
    model = field.field_info.annotation if field is not None else None
    for name in path:  # down to the object holding the unknown field (an optional one: its model)
        inner = getattr(model, "model_fields", {}).get(name)
        kinds = getattr(inner.annotation, "__args__", (inner.annotation,)) if inner is not None else ()
        model = next((k for k in kinds if hasattr(k, "model_fields")), None)
    hidden = getattr(model, "UNIMPLEMENTED", {})
    return [name for name in getattr(model, "model_fields", {}) if name not in hidden] or ["no other field"]


def server_error(request: HTTPRequest, e: Exception) -> JSONResponse:
    """An error no route expected: 500, its class named (the traceback is in the log)."""
    return JSONResponse(error_body(500, f"internal server error ({type(e).__name__})"), 500)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batcher's worker stops with the server, waiting at most the shutdown timeout
    for the engine's current run (a run that never ends cannot hold the process: the
    worker is a daemon thread)."""
    yield
    app.state.batcher.close(timeout=app.state.shutdown_timeout)


def refuse_missing_extras(bank: PromptBank) -> None:
    """Refuse to serve a loaded task whose endpoint needs a package this install lacks (a
    tagger's entity spans need seqeval, the `ner` extra), at start-up rather than with a
    500 on each of its requests. A task read later (``--lazy``, admin loads) still gets that
    500 (`tag`), naming the package.

    Raises:
        ConfigError: naming the task and the extra to install.
    """
    for name in bank.loaded():
        task = bank[name].task
        if task is not None and task.endpoint == "tag":
            try:
                require("seqeval.metrics.sequence_labeling", "ner", f"task {name!r} (a tagger: /v1/tag's entity spans)")
            except MissingExtraError as e:
                raise ConfigError(str(e)) from None


def create_app(bank: PromptBank, *, engine: Engine | None = None, max_queue: int = 1024, max_wait: float = 0.005,
               admin: bool = False, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_inputs: int = 256, max_new_tokens: int = 1024, prompt_root: str | Path | None = None,
               shutdown_timeout: float = 10.0, stream_interval: int = 1, head_share: float = 0.5,
               max_head_wait: float = 0.1) -> FastAPI:
    """The server's application.

    Args:
        bank: the loaded tasks.
        engine: the engine (default: `Engine(bank)`).
        max_queue / max_wait: the batcher's queue bound and gathering window.
        admin: enable PUT / DELETE /v1/prompts (and vLLM's load / unload_lora_adapter aliases).
        api_key: required on every path, /docs and unknown ones included (``Authorization:
            Bearer KEY`` or ``X-API-Key: KEY``), when set.
        max_body_bytes: larger request bodies get 413 (chunked bodies are counted as they arrive).
        max_inputs: most inputs (or prompts) in one request.
        max_new_tokens: most tokens one completion may ask for.
        prompt_root: admin loads only folders under it (default: anywhere the server can read).
        shutdown_timeout: at shutdown, most seconds to wait for the engine's current run.
        stream_interval: a stream's tokens per write after its first (1: each at once):
            fewer socket writes and event-loop wake-ups per token for more latency between
            pieces (SGLang's ``--stream-interval``).
        head_share / max_head_wait: while completions decode, the share of the engine's time
            head requests (classify, tag, ...) may take, and the seconds after which a
            waiting head request runs whatever the share (`batcher.TimeShare`).

    Raises:
        ConfigError: an API key no client could send (`guard.check_api_key`).
    """
    if api_key is not None:
        check_api_key(api_key)
    refuse_missing_extras(bank)
    engine = engine or Engine(bank)
    try:
        share = TimeShare(head_share=head_share, max_head_wait=max_head_wait)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batcher = Batcher(engine, max_queue=max_queue, max_wait=max_wait, time_share=share)
    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.bank, app.state.engine, app.state.batcher = bank, engine, batcher
    app.state.shutdown_timeout = shutdown_timeout
    app.router.route_class = StrictJSONRoute
    if not isinstance(stream_interval, int) or isinstance(stream_interval, bool) or stream_interval < 1:
        raise ConfigError(f"stream_interval must be a whole number of tokens, 1 or more; got {stream_interval!r}")
    app.state.server = Server(bank, engine, batcher, Metrics(bank, batcher), max_inputs, max_new_tokens,
                              prompt_root if is_url(prompt_root) else Path(prompt_root).resolve() if prompt_root else None,
                              stream_interval)
    # added first, so it runs inside the metrics middleware: refused requests are counted too
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.server.metrics)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
    for methods, path, route in ROUTES + TOKENIZER_ROUTES + (ADMIN_ROUTES if admin else ADMIN_OFF_ROUTES):
        app.add_api_route(path, route, methods=methods)
    return app


__all__ = ["create_app", "STATUS"]
