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
engine, batcher, limits, metrics) from ``request.app.state.server``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar, Literal, Union

from fastapi import FastAPI, HTTPException, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SoftPromptError
from ..extras import require
from ..io.remote import is_url
from .bank import BankEntry, PromptBank, UnknownTaskError, check_task_name
from .batcher import Batcher, QueueFullError, TooManyRequestsForQueueError
from .chat import render_chat
from .engine import Engine, ErrorKind, Request, Result
from .sampling import TokenLogprob
from .errors import error_body, field_path
from .guard import BodyError, RequestGuard, check_api_key, parse_json_body
from .logprobs import chat_logprobs, completion_logprobs
from .text import MAX_LOGPROBS, GenerationOptions, TokenStream

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


class _OpenAIBody(_Body):
    """An OpenAI request body: the fields of its `UNIMPLEMENTED` table (OpenAI fields
    softprompt does not implement, and the values of each that ask for nothing, which a
    client that does not use the field may still send) are refused by name unless
    neutral, rather than ignored."""

    UNIMPLEMENTED: ClassVar[dict[str, tuple]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _unimplemented(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = cls.UNIMPLEMENTED.get(info.field_name)
        if neutral is not None and not any(_same(value, v) for v in neutral):
            raise PydanticCustomError("unimplemented", "softprompt does not implement {field} (it takes only {neutral})",
                                      {"field": info.field_name, "neutral": " or ".join(map(json.dumps, neutral))})
        return value


#: OpenAI's completion fields that softprompt does not implement, and their neutral values
UNIMPLEMENTED = {"echo": (False,), "suffix": (None,)}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_OpenAIBody):
    """The generation fields completions and chat share."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: Union[int, None] = None
    n: int = Field(1, ge=1)
    user: Union[str, None] = None
    stream_options: Union[StreamOptions, None] = None
    presence_penalty: Union[float, None] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Union[float, None] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Union[dict[str, float], None] = None


class _Prompted(_OpenAIBody):
    model: str
    prompt: Union[str, list[str]]


class CompletionBody(_Sampled, _Prompted):  # fields in reversed base order: model, prompt, max_tokens, ...
    UNIMPLEMENTED: ClassVar[dict[str, tuple]] = UNIMPLEMENTED

    echo: Any = False
    logprobs: Union[int, None] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Union[int, None] = Field(None, ge=1)
    suffix: Any = None


def _same(value: Any, neutral: Any) -> bool:
    """`value` is the JSON value `neutral`: Python's True == 1 and False == 0, so a boolean
    matches only a boolean (``echo: 0``, ``presence_penalty: false`` are not neutral)."""
    if isinstance(value, bool) or isinstance(neutral, bool) or neutral is None:
        return value is neutral
    return value == neutral


#: OpenAI's chat fields that softprompt does not implement, and their neutral values
CHAT_UNIMPLEMENTED = {"tools": (None, []),
                      "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "functions": (None, []),
                      "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
                      "modalities": (None, ["text"]), "audio": (None,),
                      "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
                      "store": (None, False), "metadata": (None,), "service_tier": (None, "auto")}


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class _Chatting(_OpenAIBody):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)


class ChatBody(_Sampled, _Chatting):
    """A chat completion: `max_completion_tokens` (OpenAI's current name) or `max_tokens`."""

    UNIMPLEMENTED: ClassVar[dict[str, tuple]] = CHAT_UNIMPLEMENTED

    max_completion_tokens: Union[int, None] = Field(None, ge=1)
    logprobs: Union[bool, None] = None
    top_logprobs: Union[int, None] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None


class PromptBody(_Body):
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
    prompt_root: Path | str | None  # a local folder, or an fsspec URL (`io.remote`)

    def submit(self, requests: list[Request]) -> list[asyncio.Future]:
        """Queue a request's engine requests; their results, to await."""
        try:
            return [asyncio.wrap_future(f) for f in self.batcher.submit(requests)]
        except QueueFullError as e:
            raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except TooManyRequestsForQueueError as e:  # refused for ever: "retry later" would be no answer
            raise HTTPException(413, str(e)) from None

    async def run(self, requests: list[Request], http: HTTPRequest) -> list[Result]:
        """The requests' results, or, if the client goes away first, none: they are
        cancelled (and the answer, which no one reads, is 499)."""
        results = asyncio.gather(*self.submit(requests))
        await first_of({results}, http, requests)
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
    results = await server.run([Request(body.task, x, entry=entry) for x in body.inputs], request)
    check_results(results)
    return {"task": body.task, "results": [r.output for r in results]}


async def tag(body: InputsBody, request: HTTPRequest) -> dict[str, Any]:
    get_entities = require("seqeval.metrics.sequence_labeling", "ner", "a tagging answer's entity spans").get_entities

    server = server_of(request)
    entry = await server.entry_for(body.task, "tag")
    field = entry.task.word_field
    server.check_count(len(body.inputs), "inputs", "inputs")
    results = await server.run([Request(body.task, x, entry=entry) for x in body.inputs], request)
    check_results(results)
    out = []
    for x, r in zip(body.inputs, results):
        words = x.split() if isinstance(x, str) else list(x.get(field, []))
        entities = [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s : e + 1])}
                    for t, s, e in get_entities(list(r.output))]
        out.append({"tokens": words, "tags": r.output, "entities": entities})
    return {"task": body.task, "results": out}


async def completions(body: CompletionBody, request: HTTPRequest):
    """Each prompt completed `n` times (choices prompt by prompt); with `best_of`, the `n` of
    `best_of` candidates of highest log-probability per token."""
    server = server_of(request)
    entry = await server.entry_for(body.model, "completions")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: give at least one prompt", "prompt")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise APIError(400, f"best_of: {best_of} is less than n ({body.n}): best_of is how many completions to "
                       "choose the n best from", "best_of")
    if best_of > body.n and body.stream:
        raise APIError(400, "best_of: cannot be streamed (the best are known only at the end); leave best_of out or "
                       "stream false", "best_of")
    check_stream_options(body)
    what = "prompts" if best_of == 1 else f"completions ({len(prompts)} prompts x {best_of})"
    server.check_count(len(prompts) * best_of, what, "prompt")
    ranked = best_of > body.n  # candidates are ranked by their tokens' log-probabilities
    options = server.options(body.max_tokens, body, logprobs=body.logprobs if body.logprobs is not None or not ranked
                             else 0)
    completion = _Completion(body.model, f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), server.bank.tokenizer,
                             n=body.n, best_of=best_of, logprobs=body.logprobs is not None,
                             include_usage=include_usage(body))
    requests = [Request(body.model, p, generate=True, options=choice_options(options, j), entry=entry)
                for p in prompts for j in range(best_of)]
    return await completion.run(server, requests, body.stream, request)


def check_stream_options(body: _Sampled) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only with stream: true", "stream_options")


def include_usage(body: _Sampled) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def choice_options(options: GenerationOptions, j: int) -> GenerationOptions:
    """Choice `j`'s options: a seeded request's choice j samples with seed + j (choice 0
    with the request's seed: n = 1 gives what it always gave); unseeded, each draws fresh."""
    if j == 0 or options.seed is None:
        return options
    return dataclasses.replace(options, seed=(options.seed + j) % 2**64)


async def chat_completions(body: ChatBody, request: HTTPRequest):
    """The messages rendered by the tokenizer's chat template (`chat.render_chat`), then
    completed as that prompt would be: the text fills the task's one template field."""
    server = server_of(request)
    entry = await server.entry_for(body.model, "completions")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: give logprobs: true to have log-probabilities returned", "top_logprobs")
    check_stream_options(body)
    server.check_count(body.n, "choices", "n")
    options = server.options(max_tokens, body, "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    try:
        prompt = render_chat(server.bank.tokenizer, [m.model_dump() for m in body.messages], entry.model.encoder.lead)
    except SoftPromptError as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    completion = _ChatCompletion(body.model, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()),
                                 server.bank.tokenizer, n=body.n, best_of=body.n, logprobs=bool(body.logprobs),
                                 include_usage=include_usage(body))
    requests = [Request(body.model, prompt, generate=True, options=choice_options(options, j), entry=entry)
                for j in range(body.n)]
    return await completion.run(server, requests, body.stream, request)


@dataclass
class _Completion:
    """One completion request's answer: whole (a JSON body) or streamed (server-sent
    events), in OpenAI's completion format; `_ChatCompletion` changes only the format.
    Streamed, each piece carries the log-probabilities of the tokens it came from (where
    asked for); tokens that made no piece (cut by a stop string) come with the finish."""

    model: str
    ident: str
    created: int
    tokenizer: Any
    n: int = 1  # choices per prompt
    best_of: int = 1  # candidates per prompt (requests come prompt by prompt, best_of each)
    logprobs: bool = False  # the client asked for them (a ranking may have computed them anyway)
    include_usage: bool = False  # streamed: a last chunk with the usage
    object: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"

    def __post_init__(self):
        self._sent: dict[int, int] = {}  # per choice: log-probabilities streamed so far
        self._offset: dict[int, int] = {}  # ... and the characters of their tokens

    def logprobs_of(self, i: int, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """Choice `i`'s ``logprobs`` for `entries`, the next of its tokens (None: not asked for)."""
        if entries is None or not self.logprobs:
            return None
        self._sent[i] = self._sent.get(i, 0) + len(entries)
        out = completion_logprobs(self.tokenizer, entries, self._offset.get(i, 0))
        self._offset[i] = self._offset.get(i, 0) + sum(map(len, out["tokens"]))
        return out

    def choice(self, i: int, r: Result) -> dict[str, Any]:
        return {"index": i, "text": r.output, "logprobs": self.logprobs_of(i, r.logprobs),
                "finish_reason": r.finish_reason}

    def delta(self, i: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        """Choice `i`'s next piece (finish None), or its end (text "")."""
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, i: int) -> list[dict[str, Any]]:
        """Choice `i`'s deltas before its first piece."""
        return []

    def blame(self, i: int, r: Result) -> tuple[str, str]:
        """(message, param) of request `i`'s failure: the prompt it completes."""
        p = i // self.best_of
        return f"prompt {p}: {r.error}", f"prompt[{p}]"

    def check(self, results: list[Result | None]) -> None:
        """The status of the first failed result (None: not answered yet)."""
        for i, r in enumerate(results):
            if r is not None and not r.ok:
                raise APIError(STATUS[r.error_kind], *self.blame(i, r))

    async def run(self, server: Server, requests: list[Request], stream: bool, http: HTTPRequest):
        if stream:
            return await self.stream(server, requests, http)
        results = await server.run(requests, http)
        self.check(results)
        return self.answer(results)

    def answer(self, results: list[Result]) -> dict[str, Any]:
        chosen = [r for p in range(0, len(results), self.best_of) for r in self.best(results[p: p + self.best_of])]
        choices = [self.choice(i, r) for i, r in enumerate(chosen)]
        return {"id": self.ident, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(results)}

    def best(self, candidates: list[Result]) -> list[Result]:
        """A prompt's `n` choices: its candidates, or the n of highest mean log-probability
        per token (an empty completion counts 0), best first."""
        if len(candidates) == self.n:
            return candidates
        def mean(r: Result) -> float:
            return sum(e.logprob for e in r.logprobs) / len(r.logprobs) if r.logprobs else 0.0
        return sorted(candidates, key=mean, reverse=True)[: self.n]

    def usage(self, results: list[Result]) -> dict[str, int]:
        """Each prompt's tokens once; every candidate's new tokens (all were generated)."""
        prompt_tokens = sum(r.prompt_tokens for r in results[:: self.best_of])
        completion_tokens = sum(r.new_tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def chunk(self, i: int, text: str, finish: str | None, entries: list[TokenLogprob] | None = None) -> str:
        return self.event(self.delta(i, text, finish, self.logprobs_of(i, entries)))

    def event(self, choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        """A chunk of choice `choice`'s (None: none, the usage chunk); ``usage`` on every
        chunk where the client asked for it (null until the last)."""
        payload = {"id": self.ident, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "choices": [] if choice is None else [choice]}
        if self.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(self, server: Server, requests: list[Request], http: HTTPRequest) -> StreamingResponse:
        """The pieces as server-sent events, once the first piece is there: a request that
        fails before it (a bad prompt, a task that cannot generate) gets the status code a
        whole completion would, not a 200 with an error event."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        for i, r in enumerate(requests):
            r.stream = TokenStream(lambda text, logprobs, i=i: loop.call_soon_threadsafe(pieces.put_nowait,
                                                                                      (i, text, logprobs)))
        futures = server.submit(requests)
        done = asyncio.gather(*futures)
        first = asyncio.ensure_future(pieces.get())
        await first_of({first, done}, http, requests)
        early = [f.result() if f.done() else None for f in futures]
        if any(r is not None and not r.ok for r in early):
            cancel(requests)
            drop(first)
            drop(done)
            self.check(early)
        return StreamingResponse(self._events(server.metrics, first, pieces, done, requests),
                                 media_type="text/event-stream")

    async def _events(self, metrics: Metrics, first: asyncio.Future, pieces: asyncio.Queue, done: asyncio.Future,
                      requests: list[Request]) -> AsyncIterator[str]:
        """Each piece as it comes, then each prompt's finish (or error), then ``[DONE]``."""
        metrics.streams_open.inc()
        getter = first
        try:
            for i in range(len(requests)):
                for choice in self.opening(i):
                    yield self.event(choice)
            while True:
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                i, text, entries = getter.result()
                yield self.chunk(i, text, None, entries)
                getter = asyncio.ensure_future(pieces.get())
            while not pieces.empty():
                i, text, entries = pieces.get_nowait()
                yield self.chunk(i, text, None, entries)
            for i, r in enumerate(done.result()):
                if not r.ok:
                    body = error_body(STATUS[r.error_kind], *self.blame(i, r))
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    rest = None if r.logprobs is None else r.logprobs[self._sent.get(i, 0):]
                    yield self.chunk(i, "", r.finish_reason, rest)
            if self.include_usage:
                yield self.event(None, self.usage(done.result()))
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away: its rows stop at the next step
            getter.cancel()  # else asyncio warns of a pending task when the client left mid-wait
            cancel(requests)
            metrics.streams_open.dec()


class _ChatCompletion(_Completion):
    """A chat completion's answer: the text as the assistant's message; streamed, a first
    delta with the role, then the content piece by piece, then an empty delta with the
    finish reason."""

    object: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def logprobs_of(self, i: int, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None or not self.logprobs:
            return None
        self._sent[i] = self._sent.get(i, 0) + len(entries)
        return chat_logprobs(self.tokenizer, entries)

    def choice(self, i: int, r: Result) -> dict[str, Any]:
        return {"index": i, "message": {"role": "assistant", "content": r.output},
                "logprobs": self.logprobs_of(i, r.logprobs), "finish_reason": r.finish_reason}

    def delta(self, i: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": i, "delta": {"content": text} if finish is None else {}, "logprobs": logprobs,
                "finish_reason": finish}

    def opening(self, i: int) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def blame(self, i: int, r: Result) -> tuple[str, str]:
        return f"messages: {r.error}", "messages"  # every choice is of all of the messages


# -- admin ----------------------------------------------------------------------------
def refuse_base(server: Server, task: str, what: str) -> None:
    """409 for an admin change to the base model's own entry: the base is not a prompt."""
    try:
        server.bank.refuse_base_name(task, what)
    except SoftPromptError as e:
        raise APIError(409, str(e), "task") from None


async def load_prompt(task: str, body: PromptBody, request: HTTPRequest):
    server = server_of(request)
    try:
        check_task_name(task)
    except SoftPromptError as e:
        raise APIError(422, str(e), "task") from None
    refuse_base(server, task, "loaded as a task")
    if "\x00" in body.path:
        raise APIError(422, f"path {body.path!r} holds a NUL character, which no file name can", "path")
    root = server.prompt_root
    path: Path | str
    if is_url(body.path) or is_url(root):  # a prompt store at an fsspec URL (`io.remote`)
        path = body.path
        inside = is_url(root) and path.startswith(str(root).rstrip("/") + "/") and ".." not in path.split("/")
        if root is not None and not inside:
            raise APIError(403, f"path {body.path!r} is outside the prompt root {root}", "path")
    else:
        try:
            path = Path(body.path).expanduser().resolve()
        except (OSError, RuntimeError) as e:  # a symbolic link loop, an unknown ~user
            raise APIError(422, f"path {body.path!r} cannot be resolved: {e}", "path") from None
        if root is not None and root not in path.parents and path != root:
            raise APIError(403, f"path {body.path!r} is outside the prompt root {root}", "path")
    replaced = task in server.bank
    try:
        await asyncio.to_thread(server.bank.add, task, path, replace=True)
    except SoftPromptError as e:
        raise APIError(422, f"{body.path}: {e}", "path") from None
    return {"task": task, "status": "replaced" if replaced else "loaded"}


def unload_prompt(task: str, request: HTTPRequest):
    refuse_base(server_of(request), task, "removed")
    try:
        server_of(request).bank.remove(task)
    except UnknownTaskError as e:
        raise APIError(404, str(e), "task", "model_not_found") from None
    return {"task": task, "status": "removed"}


class LoadLoRAAdapterBody(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterBody(_Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's other key for an adapter; accepted, unused: prompts have names only


def _as_vllm(e: APIError) -> APIError:
    """An admin refusal in vLLM's terms: its field names, and 400 where ours is 422 (vLLM
    answers 400 for an adapter it cannot load)."""
    param = {"task": "lora_name", "path": "lora_path"}.get(e.param, e.param)
    return APIError(400 if e.status_code == 422 else e.status_code, str(e.detail), param, e.code)


async def load_lora_adapter(body: LoadLoRAAdapterBody, request: HTTPRequest) -> PlainTextResponse:
    """vLLM's ``POST /v1/load_lora_adapter``: `load_prompt`, with vLLM's body and answer. As
    vLLM does, a name already loaded is refused (400) unless ``load_inplace`` replaces it."""
    server = server_of(request)
    try:
        refuse_base(server, body.lora_name, "loaded as a task")
        if body.lora_name in server.bank and not body.load_inplace:
            raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded "
                                "(load_inplace: true replaces it).", "lora_name")
        await load_prompt(body.lora_name, PromptBody(path=body.lora_path), request)
    except APIError as e:
        raise _as_vllm(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


def unload_lora_adapter(body: UnloadLoRAAdapterBody, request: HTTPRequest) -> PlainTextResponse:
    """vLLM's ``POST /v1/unload_lora_adapter``: `unload_prompt` (404 for a name not loaded)."""
    try:
        unload_prompt(body.lora_name, request)
    except APIError as e:
        raise _as_vllm(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def admin_off():
    """Without --admin the routes take no body at all, so the answer is 403 whatever is sent
    (a route with a body model would parse, and answer 422 on, a body it then refuses)."""
    raise HTTPException(403, "admin endpoints are off: start the server with --admin to load and unload prompts")


#: (methods, path, route function): the server's routes, then the admin routes (or their refusal)
ROUTES = [(["GET"], "/health", health), (["GET"], "/metrics", metrics), (["GET"], "/v1/models", models),
          (["POST"], "/v1/classify", classify), (["POST"], "/v1/tag", tag), (["POST"], "/v1/completions", completions),
          (["POST"], "/v1/chat/completions", chat_completions)]
ADMIN_ROUTES = [(["PUT"], "/v1/prompts/{task}", load_prompt), (["DELETE"], "/v1/prompts/{task}", unload_prompt),
                (["POST"], "/v1/load_lora_adapter", load_lora_adapter),
                (["POST"], "/v1/unload_lora_adapter", unload_lora_adapter)]
ADMIN_OFF_ROUTES = [(["PUT", "DELETE"], "/v1/prompts/{task}", admin_off),
                    (["POST"], "/v1/load_lora_adapter", admin_off), (["POST"], "/v1/unload_lora_adapter", admin_off)]


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route (``other`` for no
    route), to the end of its answer (a stream's last chunk). A plain ASGI class, not
    Starlette's ``BaseHTTPMiddleware``: that one runs each request in a task group with
    memory streams between them, which cost more than the whole of a /health answer."""

    def __init__(self, app, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # what an exception out of the app becomes

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
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


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


def create_app(bank: PromptBank, *, engine: Engine | None = None, max_queue: int = 1024, max_wait: float = 0.005,
               admin: bool = False, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_inputs: int = 256, max_new_tokens: int = 1024, prompt_root: str | Path | None = None,
               shutdown_timeout: float = 10.0) -> FastAPI:
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

    Raises:
        ConfigError: an API key no client could send (`guard.check_api_key`).
    """
    if api_key is not None:
        check_api_key(api_key)
    engine = engine or Engine(bank)
    batcher = Batcher(engine, max_queue=max_queue, max_wait=max_wait)
    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.bank, app.state.engine, app.state.batcher = bank, engine, batcher
    app.state.shutdown_timeout = shutdown_timeout
    app.router.route_class = StrictJSONRoute
    app.state.server = Server(bank, engine, batcher, Metrics(bank, batcher), max_inputs, max_new_tokens,
                              prompt_root if is_url(prompt_root) else Path(prompt_root).resolve() if prompt_root else None)
    # added first, so it runs inside the metrics middleware: refused requests are counted too
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.server.metrics)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
    for methods, path, route in ROUTES + (ADMIN_ROUTES if admin else ADMIN_OFF_ROUTES):
        app.add_api_route(path, route, methods=methods)
    return app


__all__ = ["create_app", "STATUS"]
