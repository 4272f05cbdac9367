"""The one shape of every error the server sends: OpenAI's.

    {"error": {"message": "temperature: ...", "type": "invalid_request_error",
               "param": "temperature", "code": null}}

The official ``openai`` client reads ``error.message`` into the exception it raises (and
``param``, ``type``, ``code`` into its attributes); with FastAPI's ``{"detail": ...}`` it
could show only "Error code: 404". Every path that answers an error builds its body here:
the app's exception handlers (routes, validation), the guard's 401 / 413 / 400, the
connection cap's 503 and a streamed completion's error event.
"""

from __future__ import annotations

import json
from typing import Any

#: OpenAI's error type of each status (the client picks its exception by the status; the
#: type tells a program what kind of mistake it was). Types as OpenAI's error-codes guide
#: names them; its older 429s said ``requests``, its current ones ``rate_limit_error``.
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an answer of `status`: a mistake in the request (4xx:
    ``invalid_request_error``), the key, the admin switch, the queue, or the server (5xx)."""
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error object of an answer of `status`. `param`: the request field at fault
    (``temperature``, ``inputs[1]``), when one is."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_json(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """`error_body` as the bytes of a response body."""
    return json.dumps(error_body(status, message, param, code)).encode()


def field_path(loc: tuple | list) -> str | None:
    """A field's location as a client writes it: ``("body", "inputs", 1, "text")`` ->
    ``inputs[1].text`` (None for the body as a whole)."""
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p not in ("body", "query", "path")]
    return "".join(parts).lstrip(".") or None


__all__ = ["error_body", "error_json", "error_type", "field_path"]
