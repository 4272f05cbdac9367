"""The server's front door: the API key and the request-body limit, checked before any
route, for every path.

Both live in one ASGI middleware rather than in each endpoint so that nothing escapes
them: FastAPI's own pages (``/docs``, ``/openapi.json``), unknown paths and a body that
fails validation all meet the key first, and a body sent in chunks (no Content-Length)
is counted while it arrives instead of being read whole by the endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable

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
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and not self._authorised(headers):
            await _reply(send, 401, "missing or wrong API key (Authorization: Bearer <key>)",
                         [(b"www-authenticate", b"Bearer")])
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


async def _reply(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["RequestGuard"]
