"""The server's front door: the API key and the request-body limit, checked before any
route, for every path; and what every JSON body must be (`parse_json_body`).

The key and the limit live in one ASGI middleware rather than in each endpoint so that
nothing escapes them: FastAPI's own pages (``/docs``, ``/openapi.json``), unknown paths and
a body that fails validation all meet the key first, and a body sent in chunks (no
Content-Length) is counted while it arrives instead of being read whole by the endpoint.

JSON bodies are parsed strictly, once, for every route (the app's route class calls
`parse_json_body`): Python's `json` takes ``NaN``, ``Infinity`` and ``1e400`` (which it
reads as inf), none of which is JSON (RFC 8259), and a lone UTF-16 surrogate
(``"\\ud800"``) that no UTF-8 encoder, tokenizer or response can take. Either used to
end in a plain-text 500 (the validation error that quoted it could not be written) or
in a failed batch; refused here, the answer names the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from typing import Any, Awaitable, Callable

from ..errors import ConfigError, SoftPromptError
from .errors import error_json

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestGuard:
    """ASGI middleware: 401 without the API key (when one is set), 413 for a body over
    `max_body_bytes` (declared by Content-Length, or counted as chunks arrive).

    Args:
        app: the wrapped ASGI application.
        api_key: the key every request must carry, as ``Authorization: Bearer KEY`` or
            ``X-API-Key: KEY``; None lets every request in.
        max_body_bytes: the largest request body taken.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.api_key = check_api_key(api_key).encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and not self._authorised(headers):
            await _reply(send, 401, "missing or wrong API key (Authorization: Bearer <key>)",
                         [(b"www-authenticate", b"Bearer")], code="invalid_api_key")
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _reply(send, 400, f"Content-Length {length!r} is not a byte count")
            elif int(length) > self.max_body_bytes:
                if int(length) <= 2 * self.max_body_bytes:  # beyond that, a reset is the cheaper answer
                    await _drain(receive, int(length))
                await _reply(send, 413, f"request body of {length} bytes is over the limit of {self.max_body_bytes}")
            else:  # the HTTP parser delivers no more than the declared length
                await self.app(scope, receive, send)
            return
        # No declared length (chunked transfer): read the body up to the limit before the
        # application sees any of it, then hand it over in one piece.
        body, tail = bytearray(), None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                tail = message  # the client left before the body ended
                break
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                if message.get("more_body", False):
                    await _drain(receive, self.max_body_bytes)
                await _reply(send, 413, f"request body is over the limit of {self.max_body_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        first: list[Message] = [tail] if tail is not None else [{"type": "http.request", "body": bytes(body),
                                                                  "more_body": False}]

        async def replay() -> Message:
            # after the body, `receive` still reports the client's disconnect to streams
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        header = headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return bool(given) and hmac.compare_digest(given.encode(), self.api_key)


async def _drain(receive: Receive, budget: int, timeout: float = 5.0) -> None:
    """Read and drop the rest of a refused body (up to `budget` bytes, `timeout` seconds).
    Closing with bytes unread makes the kernel reset the connection, and a client still
    sending would then lose the 413 (found by the load test)."""
    async def loop() -> None:
        left = budget
        while left >= 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            left -= len(message.get("body", b""))

    try:
        await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        pass


async def _reply(send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]] = (),
                 code: str | None = None) -> None:
    body = error_json(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


def check_api_key(key: str) -> str:
    """The key, if a client can send it: HTTP header values are ASCII, without control
    characters, and lose their leading and trailing blanks on the way, so any other key
    could never match and would lock every client out.

    Raises:
        ConfigError: the key is empty, not printable ASCII, or starts or ends with a blank.
    """
    if not key:
        raise ConfigError("the API key is empty")
    bad = next((i for i, c in enumerate(key) if not (c.isascii() and c.isprintable())), None)
    if bad is not None:
        raise ConfigError(f"the API key has {key[bad]!r} at character {bad}: a key is sent in an HTTP header, which "
                          "takes printable ASCII only (letters, digits, punctuation)")
    if key != key.strip():
        raise ConfigError("the API key starts or ends with a blank, which HTTP drops from header values")
    return key


# -- strict JSON bodies ------------------------------------------------------------------
class BodyError(SoftPromptError):
    """A JSON body the server refuses; `status` is the HTTP status of the answer, `param`
    the field at fault (``inputs[3].text``; None for the body as a whole)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class _NotFinite:
    """Stands where the body had ``NaN``, ``Infinity`` or a number past a 64-bit float,
    so that the walk over the parsed body can name its field."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _finite(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def parse_json_body(body: bytes | str) -> Any:
    """A request body as standard JSON: finite numbers, text that is valid Unicode.

    Raises:
        json.JSONDecodeError: not JSON at all (the app's validation 400, with the position).
        BodyError: 400 for ``NaN``, ``Infinity``, ``-Infinity``, a number beyond a 64-bit
            float (``1e400``), a body that nests too deeply or is not UTF-8; 422 for a
            string (or key) with a lone UTF-16 surrogate. The message names the field
            (``inputs[3].text``).
    """
    try:
        value = json.loads(body, parse_constant=_NotFinite, parse_float=_finite)
    except json.JSONDecodeError:  # a ValueError too, but FastAPI's to report
        raise
    except RecursionError:
        raise BodyError(400, "the JSON body nests too deeply") from None
    except ValueError as e:  # not UTF-8, or an integer of more digits than Python reads
        raise BodyError(400, f"the body cannot be read as JSON: {e}") from None
    _check_values(value)
    return value


def _check_values(value: Any) -> None:
    """Walk the parsed body in document order (without recursion: JSON nests as deep as
    the parser went) and refuse the first non-finite number or unencodable string, by its
    path."""
    stack: list[tuple[Any, tuple | None, Any]] = [(value, None, None)]  # (value, parent's entry, key)
    while stack:
        entry = stack.pop()
        item = entry[0]
        if isinstance(item, str):
            _check_text(item, entry)
        elif isinstance(item, _NotFinite):
            raise BodyError(400, f"{_path(entry)}: {item.text} is not a JSON number: JSON numbers are finite "
                                 "(no NaN or Infinity) and must fit a 64-bit float", _path(entry))
        elif isinstance(item, dict):
            for key in item:
                _check_text(key, entry, key=True)
            stack.extend((item[key], entry, key) for key in reversed(item))
        elif isinstance(item, list):
            stack.extend((item[i], entry, i) for i in reversed(range(len(item))))


def _check_text(text: str, entry: tuple, key: bool = False) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"{_path(entry)}: a key" if key else _path(entry)
        raise BodyError(422, f"{where} holds a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x}) at character "
                             f"{e.start}: text must be valid Unicode", _path(entry)) from None


def _path(entry: tuple) -> str:
    """``inputs[3].text`` for an entry of `_check_values`' walk (``body`` for the root)."""
    parts = []
    while entry[1] is not None:
        key = entry[2]
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}" if key.isidentifier() else f"[{key!r}]")
        entry = entry[1]
    return "".join(reversed(parts)).lstrip(".") or "body"


__all__ = ["RequestGuard", "BodyError", "parse_json_body", "check_api_key"]
