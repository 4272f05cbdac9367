"""The HTTP server process: uvicorn, with the limits a server on an open port needs.

uvicorn bounds the keep-alive idle time (``timeout_keep_alive``), the header size
(h11's 16 KiB) and, if asked, the drain at shutdown (``timeout_graceful_shutdown``). It
has no deadline for a request's headers or body (a client that sends a byte a second,
or nothing after connecting, holds its connection for ever), no cap on open connections
(``limit_concurrency`` answers 503 to new *requests*, but every connection still holds
a file descriptor until the process runs out of them), and it logs a traceback for each
failure (20,000 half-open connections wrote 114 MB of log in 40 s). This module adds
them through uvicorn's documented extension point, the ``http=`` protocol class:

- `GuardedHttpToolsProtocol` (or `GuardedH11Protocol` where httptools is not installed):
  a deadline for each phase of reading a request (its headers,
  then its body) and for a response the client stops reading; past it, the connection
  is closed.
- `ConnectionGuard`: at most `HTTPLimits.max_connections` open; a connection beyond the
  cap closes the one that has waited longest without a request in progress (a half-open
  or idle keep-alive one), so that a flood of idle connections cannot lock working
  clients out; only when every connection is busy with a request is the new one refused
  (503).
- `LogRateLimit` (`log_limit.py`): at most `log_limit` records of one message template per
  `log_interval` seconds, then one line saying the rest are dropped.
- `raise_open_file_limit`: the soft ``RLIMIT_NOFILE`` raised to the hard limit, and a
  clear error when the cap cannot fit it.

Another server (hypercorn) was considered: it has a per-read timeout, which a client
sending a byte at a time defeats, and no connection cap either, and it would be one more
dependency for the same extension work.

    serve(app, host="127.0.0.1", port=8000, limits=HTTPLimits(timeout_header=5))
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError
from .errors import error_json
from .log_limit import LogRateLimit, limit_logs

log = logging.getLogger("softprompt.serve.http")

#: connections waiting in the kernel to be accepted (uvicorn's default). asyncio accepts up
#: to this many at a time, before any protocol sees them, so a burst holds sockets beyond
#: the cap until `ConnectionGuard` closes them (measured: 2,000 at once peaked at 2,009
#: descriptors with a cap of 1,000, and settled at the cap within 0.5 s). A shorter queue
#: would bound that, but a flood then fills it and working clients' connections wait for
#: the kernel's one-second SYN retry (measured: /health took 1.06 s with 100).
ACCEPT_BATCH = 2048
#: file descriptors the cap leaves for the process's own (model files, the log, pipes, the
#: listener) and for a burst not yet cut back; the soft limit is raised to the hard one,
#: usually far above
RESERVED_FILES = 256

_REFUSED = error_json(503, "the server has too many open connections; retry later")


@dataclass(frozen=True)
class HTTPLimits:
    """The connection-level limits of the server (seconds, counts); `softprompt serve`
    exposes each as the option of the same name (``timeout_header``: ``--timeout-header``).

    Attributes:
        timeout_header: most seconds from a connection's start (or its previous response's
            end) until a request's headers are complete.
        timeout_body: most seconds from the end of the headers until the body is complete.
        timeout_send: most seconds a response may wait for a client that stopped reading.
        timeout_keep_alive: seconds an idle keep-alive connection stays open.
        timeout_graceful_shutdown: at shutdown, most seconds to let running requests finish before
            they are cancelled (and again for the engine's current run).
        max_connections: most open connections.
        log_limit / log_interval: most log records of one message template per interval.
    """

    timeout_header: float = 10.0
    timeout_body: float = 30.0
    timeout_send: float = 60.0
    timeout_keep_alive: float = 5.0
    timeout_graceful_shutdown: float = 10.0
    max_connections: int = 1024
    log_limit: int = 10
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a positive finite number, got {value!r}")

    def fit_open_files(self) -> int:
        """Raise this process's open-file limit for `max_connections` (`raise_open_file_limit`)."""
        return raise_open_file_limit(self.max_connections + RESERVED_FILES)


# -- connections ---------------------------------------------------------------------------
class ConnectionGuard:
    """The open connections of one server, and which of them wait without a request in
    progress: what the cap closes.

    Beyond the cap, the first to go is the connection that began a request and has not
    finished its headers for the longest (what a slow-header or half-open attack holds);
    then the one idle the longest with nothing received (fresh, or a keep-alive between
    requests). The cap is enforced `GRACE` seconds after it is passed, not at once: a
    burst is accepted faster than the server reads what the new connections sent, and
    a working client's connection, whose headers came in its first packet, would look as
    idle as an attacker's until then (measured: /health reset now and then under 2,000
    half-open connections). Only when every connection is busy with a request is a new
    one refused (503)."""

    GRACE = 0.2

    def __init__(self, limits: HTTPLimits):
        self.limits = limits
        self.open: set[GuardedH11Protocol] = set()
        self.started: OrderedDict[GuardedH11Protocol, None] = OrderedDict()  # headers begun, not finished
        self.idle: OrderedDict[GuardedH11Protocol, None] = OrderedDict()  # nothing received since the last request
        self.evicted = self.refused = 0
        self._enforcing: asyncio.TimerHandle | None = None

    def admit(self, connection: "GuardedH11Protocol") -> bool:
        """Count a new connection in; False: at the cap with every connection busy."""
        if len(self.open) >= self.limits.max_connections and not (self.started or self.idle):
            self.refused += 1
            log.warning("%d connections open, each with a request in progress: refused a new one (503); "
                        "see --max-connections", len(self.open))
            return False
        self.open.add(connection)
        if len(self.open) > self.limits.max_connections and self._enforcing is None:
            self._enforcing = connection.loop.call_later(self.GRACE, self.enforce)
        return True

    def enforce(self) -> None:
        """Close waiting connections (begun headers first, oldest first) down to the cap."""
        self._enforcing = None
        closed = 0
        while len(self.open) > self.limits.max_connections and (self.started or self.idle):
            oldest, _ = (self.started or self.idle).popitem(last=False)
            self.forget(oldest)
            oldest.transport.close()
            closed += 1
        if closed:
            self.evicted += closed
            log.warning("over --max-connections (%d): closed %d connection(s) waiting without a request",
                        self.limits.max_connections, closed)

    def waiting(self, connection: "GuardedH11Protocol", phase: str | None) -> None:
        """Where a connection is: waiting for a request with nothing received ("idle"),
        in the middle of its headers ("started"), or serving a request (None)."""
        if phase == "started" and connection in self.started:
            return  # its place is kept from its first byte: sending a byte at a time earns nothing
        self.started.pop(connection, None)
        self.idle.pop(connection, None)
        if phase is not None and connection in self.open:
            (self.started if phase == "started" else self.idle)[connection] = None

    def forget(self, connection: "GuardedH11Protocol") -> None:
        self.open.discard(connection)
        self.started.pop(connection, None)
        self.idle.pop(connection, None)


class _Guarded:
    """What both guarded protocols add to uvicorn's: a deadline on each phase of reading
    a request, one on a stalled response, and the connection cap (`ConnectionGuard`).

    A subclass says where the client's side is (`_reading`): ``"headers"`` (its headers
    are not complete yet, or no request since the last response), ``"body"`` (its body is
    arriving) or None (the app has the request); and whether a request's first bytes
    have come (`_begun`). Entering a phase arms its deadline; when it passes, the
    connection is closed.
    """

    def _guard_init(self, guard: "ConnectionGuard") -> None:
        self.guard = guard
        self._phase: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None

    def _reading(self) -> str | None:
        raise NotImplementedError

    def _begun(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if not self.guard.admit(self):
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                            % (len(_REFUSED), _REFUSED))
            transport.close()
            return
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._deadline, self._stalled):
            if timer is not None:
                timer.cancel()
        self.guard.forget(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._phase == "headers" and self._begun() and not self.transport.is_closing():
            self.guard.waiting(self, "started")  # a request begun: first to go beyond the cap
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]  # may start the next (pipelined) request at once
        self._track()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.guard.limits.timeout_send, self._expire, "response")

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _track(self) -> None:
        if self.transport.is_closing():
            return
        phase = self._reading()
        if phase == self._phase:
            return
        self._phase = phase
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        limits = self.guard.limits
        if phase is not None:
            seconds = limits.timeout_header if phase == "headers" else limits.timeout_body
            if phase == "headers" and self.cycle is not None:
                seconds += limits.timeout_keep_alive  # between requests: the keep-alive wait, then the headers
            self._deadline = self.loop.call_later(seconds, self._expire, phase)
        self.guard.waiting(self, "idle" if phase == "headers" else None)

    def _expire(self, phase: str) -> None:
        """The client took too long: close its connection (a stalled response's at once,
        as its unsent bytes would hold it open)."""
        log.info("closed a connection: its request's %s took too long", phase)
        self.guard.forget(self)
        if phase == "response":
            self.transport.abort()
        else:
            self.transport.close()


class GuardedH11Protocol(_Guarded, H11Protocol):
    """uvicorn's h11 protocol, guarded (`_Guarded`); the phase is h11's state of the
    client's side after every event: IDLE (headers), SEND_BODY (body), anything else (the
    app has the request). h11 bounds the headers at 16 KiB."""

    def __init__(self, config, server_state, app_state, _loop=None, *, guard: ConnectionGuard):
        super().__init__(config, server_state, app_state, _loop)
        self._guard_init(guard)

    def _reading(self) -> str | None:
        state = self.conn.their_state
        return "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None

    def _begun(self) -> bool:
        return self.conn.their_state is h11.IDLE


try:  # uvicorn's faster protocol, on llhttp (the serve extra installs httptools)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is missing: the h11 protocol serves
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class GuardedHttpToolsProtocol(_Guarded, HttpToolsProtocol):
        """uvicorn's httptools protocol, guarded (`_Guarded`): the phase follows the
        parser's callbacks (a message begun: headers; its headers complete: body; the
        message complete: the app's, until its response is complete). llhttp sets no bound
        on the headers, so they are bounded here as h11 bounds them (`MAX_HEADER_BYTES`:
        431 and close)."""

        MAX_HEADER_BYTES = 16 * 1024

        def __init__(self, config, server_state, app_state, _loop=None, *, guard: ConnectionGuard):
            super().__init__(config, server_state, app_state, _loop)
            self._guard_init(guard)
            self._message: str | None = None  # "headers" / "body" while a request arrives
            self._header_bytes = 0

        def _reading(self) -> str | None:
            if self._message is not None:
                return self._message
            return "headers" if self.cycle is None or (self.cycle.response_complete and not self.pipeline) else None

        def _begun(self) -> bool:
            return self._message == "headers"

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > self.MAX_HEADER_BYTES:  # stops the parser: uvicorn answers 400, made 431 below
                raise ValueError("request headers too large")

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def send_400_response(self, msg: str) -> None:
            if self._header_bytes <= self.MAX_HEADER_BYTES:
                super().send_400_response(msg)
                return
            body = error_json(431, f"request headers over {self.MAX_HEADER_BYTES} bytes")
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                 b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._message, self._header_bytes = "headers", 0

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._message = "body"

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._message = None
else:  # pragma: no cover
    GuardedHttpToolsProtocol = None


def guarded_protocol():
    """The guarded protocol class `serve` runs: httptools' where it is installed (it
    parses a request in about half h11's time: /health answered in 0.17 ms of server
    time instead of 0.32, measured), h11's otherwise."""
    return GuardedHttpToolsProtocol or GuardedH11Protocol


# -- the process ----------------------------------------------------------------------------
def raise_open_file_limit(needed: int) -> int:
    """Raise the soft limit on open files to the hard limit (the usual soft default, 1024,
    is what a connection flood used to exhaust); the soft limit now.

    Raises:
        ConfigError: `needed` descriptors do not fit under the hard limit.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # macOS refuses more than OPEN_MAX whatever the hard limit says
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ConfigError(f"--max-connections needs about {needed} open files with the server's own, but this "
                          f"process may open at most {soft} (ulimit -n; hard limit {hard}): lower --max-connections "
                          "or raise the limit")
    return soft


def serve(app, *, host: str, port: int, limits: HTTPLimits = HTTPLimits(), log_level: str = "warning") -> None:
    """Run `app` under uvicorn with `limits` until SIGINT or SIGTERM (then it drains for
    at most ``limits.timeout_graceful_shutdown`` seconds, cancels what still runs, and exits).

    Raises:
        ConfigError: the connection cap does not fit the open-file limit.
    """
    import uvicorn

    limits.fit_open_files()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", ws="none",
                            backlog=ACCEPT_BATCH, http=partial(guarded_protocol(), guard=ConnectionGuard(limits)),
                            timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=limits.timeout_graceful_shutdown)  # type: ignore[arg-type]
    limit_logs(LogRateLimit(limits.log_limit, limits.log_interval))  # after uvicorn made its handlers
    uvicorn.Server(config).run()


__all__ = ["HTTPLimits", "ConnectionGuard", "GuardedH11Protocol", "GuardedHttpToolsProtocol", "guarded_protocol", "LogRateLimit", "limit_logs",
           "raise_open_file_limit", "serve"]
