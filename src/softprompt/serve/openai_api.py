"""The OpenAI API's completion routes: ``POST /v1/completions`` and ``POST
/v1/chat/completions``, their bodies (every OpenAI field softprompt does not implement is
refused by name unless neutral: `openai_bodies`) and their answers, whole or streamed as
server-sent events (`_Completion`, `_ChatCompletion`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, ClassVar

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from ..errors import SoftPromptError
from .chat import render_chat
from ..encode import TokenIds
from .request import Request, Result
from .handoff import Pieces
from .inputs import TokenIdError, check_token_ids, example_of
from .errors import error_body
from .logprobs import chat_logprobs, completion_logprobs, echo_logprobs
from .openai_bodies import ChatBody, ChatMessage, CompletionBody, _Sampled  # noqa: F401 (ChatMessage: re-exported)
from .sampling import TokenLogprob
from .server import STATUS, APIError, Metrics, Server, cancel, drop, first_of, server_of
from .text import GenerationOptions, TokenStream
from .timeline import follow

try:  # the serve extra installs it; without it, json writes the same bodies (`FastJSON`)
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None


# -- routes ---------------------------------------------------------------------------
async def completions(body: CompletionBody, request: HTTPRequest):
    """Each prompt completed `n` times (choices prompt by prompt); with `best_of`, the `n` of
    `best_of` candidates of highest log-probability per token."""
    server = server_of(request)
    entry = await server.entry_for(body.model, "completions")
    prompts = prompts_of(body.prompt, server.bank.vocabulary_size)
    for i, p in enumerate(prompts):
        if isinstance(p, TokenIds):
            try:  # a template of several fields (or of words) has no one place for them
                example_of(entry, p)
            except SoftPromptError as e:
                raise APIError(400, f"prompt[{i}]: {e}", "prompt") from None
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise APIError(400, f"best_of: {best_of} is less than n ({body.n}): best_of is how many completions to "
                       "choose the n best from", "best_of")
    if best_of > body.n and body.stream:
        raise APIError(400, "best_of: cannot be streamed (the best are known only at the end); leave best_of out or "
                       "stream false", "best_of")
    check_stream_options(body)
    check_echo(body, best_of)
    what = "prompts" if best_of == 1 else f"completions ({len(prompts)} prompts x {best_of})"
    server.check_count(len(prompts) * best_of, what, "prompt")
    ranked = best_of > body.n  # candidates are ranked by their tokens' log-probabilities
    options = server.options(max(body.max_tokens, 1), body,
                             logprobs=body.logprobs if body.logprobs is not None or not ranked else 0)
    if body.max_tokens == 0:  # echo only: the prompt scored, nothing generated (the parser takes 1 and more)
        options = dataclasses.replace(options, max_new_tokens=0)
    completion = _Completion(body.model, f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), server.bank.tokenizer,
                             n=body.n, best_of=best_of, logprobs=body.logprobs is not None,
                             include_usage=include_usage(body), echo=prompts if body.echo else None,
                             kind="score" if body.max_tokens == 0 else "complete")
    requests = [Request(body.model, p, generate=True, options=choice_options(options, j), entry=entry, echo=body.echo)
                for p in prompts for j in range(best_of)]
    return await completion.run(server, requests, body.stream, request)


def prompts_of(prompt: Any, vocabulary_size: int) -> list[str | TokenIds]:
    """The body's prompts: texts, or token ids (`TokenIds`), each id checked against the
    vocabulary (a bad one named by its place: ``prompt[1][7]``)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):  # one prompt of token ids
        prompt, place = [prompt], lambda i, j: f"prompt[{j}]"
    else:
        place = lambda i, j: f"prompt[{i}][{j}]"  # noqa: E731
    if not prompt:
        raise APIError(400, "prompt: give at least one prompt", "prompt")
    prompts: list[str | TokenIds] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            prompts.append(p)
            continue
        try:
            check_token_ids(p, vocabulary_size)
        except TokenIdError as e:
            where = place(i, e.position)
            raise APIError(400, f"{where}: {e.problem}", where) from None
        prompts.append(TokenIds(p))
    return prompts


class FastJSON(Response):
    """A completion's body serialised as it is, by orjson where installed (the serve
    extra's). An echoed prompt of lm-eval lists hundreds of tokens with their best
    alternatives: FastAPI's encoder walked every one first (7 us a token, more than its
    scores cost on a GPU), and json.dumps takes 1.0 us a token against orjson's 0.09
    (this CPU). The body holds only JSON types."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if orjson is not None:
            return orjson.dumps(content)
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def check_echo(body: CompletionBody, best_of: int) -> None:
    """``echo`` (the prompt before the completion; with ``logprobs``, its tokens scored) and
    ``max_tokens: 0`` (only with echo), in the combinations softprompt answers."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it is taken only with echo: true (the prompt scored)",
                       "max_tokens")
    if body.echo and body.stream:
        raise APIError(400, "echo: cannot be streamed here; send stream: false", "echo")
    if body.echo and best_of > body.n:
        raise APIError(400, "echo: not with best_of above n (candidates ranked by their log-probabilities)", "echo")


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
                                 include_usage=include_usage(body), kind="chat")
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
    echo: list[Any] | None = None  # echo: the prompts (texts or `TokenIds`), each before its completion
    kind: str = "complete"  # what the request is, for its stages' metrics (`timeline`): complete, score, chat
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
        if self.echo is not None:
            return self.echoed(i, r)
        return {"index": i, "text": r.output, "logprobs": self.logprobs_of(i, r.logprobs),
                "finish_reason": r.finish_reason}

    def echoed(self, i: int, r: Result) -> dict[str, Any]:
        """Choice `i` with its prompt before its text; ``logprobs`` over the prompt's own
        tokens (the first with none: nothing of the prompt comes before it) and then the
        generated ones (an end-of-sequence token that ended it included)."""
        prompt = self.echo[i // self.best_of]
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(list(prompt))
        logprobs = None
        if self.logprobs:
            logprobs = echo_logprobs(self.tokenizer, r.prompt_ids or [], r.prompt_logprobs or [], r.logprobs or [])
        return {"index": i, "text": text + r.output, "logprobs": logprobs, "finish_reason": r.finish_reason}

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
        results = await server.run(requests, http, self.kind)
        self.check(results)
        return FastJSON(self.answer(results))

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
        """Each prompt's tokens once; every candidate's new tokens (all were generated).
        ``prompt_tokens`` are the request's own tokens (the task template's text and the
        prompt: what a client's tokenizer can count); the task's virtual tokens, which no
        tokenizer knows, are counted apart in ``virtual_tokens`` (softprompt's field; not
        in ``total_tokens``)."""
        prompt_tokens = sum(r.prompt_tokens for r in results[:: self.best_of])
        completion_tokens = sum(r.new_tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "virtual_tokens": sum(r.virtual_tokens for r in results[:: self.best_of])}

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
        mailbox, pieces = server.mailbox, Pieces(asyncio.get_running_loop())
        for i, r in enumerate(requests):  # called on the engine's thread: handed over a step's pieces at a time
            r.stream = TokenStream(lambda text, logprobs, i=i: mailbox.post(pieces.put, (i, text, logprobs)))
        timeline = follow(http.scope, self.kind, requests)
        futures = server.submit(requests)
        done = asyncio.gather(*futures)

        def answered(_: asyncio.Future) -> None:  # after every piece: both come through the mailbox
            pieces.close()
            if timeline is not None:
                timeline.deliver()

        done.add_done_callback(answered)
        await first_of({pieces.ready(), done}, http, requests)
        early = [f.result() if f.done() else None for f in futures]
        if any(r is not None and not r.ok for r in early):
            cancel(requests)
            drop(done)
            self.check(early)
        return StreamingResponse(self._events(server.metrics, pieces, done, requests, server.stream_interval),
                                 media_type="text/event-stream")

    async def _events(self, metrics: Metrics, pieces: Pieces, done: asyncio.Future,
                      requests: list[Request], interval: int = 1) -> AsyncIterator[str]:
        """Each piece as it comes (those there at once in one write; after the first, at
        least `interval` pieces a write: `serve --stream-interval`), then each prompt's
        finish (or error), then ``[DONE]``."""
        metrics.streams_open.inc()
        try:
            for i in range(len(requests)):
                for choice in self.opening(i):
                    yield self.event(choice)
            at_least = 1  # the first piece at once, then `stream_interval` pieces a write
            while taken := await pieces.take(at_least):
                yield "".join(self.chunk(i, text, None, entries) for i, text, entries in taken)
                at_least = interval
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
