"""Where an HTTP request's time goes inside the server: its stages, measured.

    start     the ASGI request begins (`app.RequestMetrics`: headers read)
      parse     body read, parsed, validated, task bound, engine requests made
    queued    `Batcher.submit` (`Request.queued`)
      queue     waiting in the batcher's queue (its gathering window included)
    taken     taken by the worker: `Batcher._take` for a run, `Batcher._admit` between two
              decode steps (`Request.taken`)
      engine    the engine's run, up to this row's answer (its batch's, not the whole run's)
    answered  the batcher answers its future, on the engine's thread (`Request.answered`)
      handoff   from the engine's thread to the route, resumed on the event loop
              (`handoff.Mailbox`, the futures, the route's task waking)
    delivered the route has its results (`Timeline.deliver`)
      respond   the answer built and sent (a stream: its last chunk) to the end of the ASGI call
    end

A request of several inputs (engine requests) is followed through the one answered last:
the one its route waits for. The five stages add up to the request's time in the server,
what ``softprompt_request_seconds`` counts. All stamps are the batcher's clock, `time.perf_counter` (one clock
for both threads); the engine's thread writes three floats per request, the event loop
reads them once the request is answered (the futures order the writes before the reads).
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Sequence

from .request import Request

#: the stages, in order (`Timeline.stages`)
STAGES = ("parse", "queue", "engine", "handoff", "respond")
#: the key of an HTTP request's `Timeline` in its ASGI scope
SCOPE_KEY = "softprompt.timeline"


class Timeline:
    """One HTTP request's way through the server: begun by the metrics middleware, given
    its kind and engine requests by the route (`follow`), delivered (`deliver`) when the
    route has their results back on the event loop."""

    __slots__ = ("start", "kind", "requests", "delivered")

    def __init__(self, start: float):
        self.start = start
        self.kind: str | None = None  # classify, tag, complete, chat, score; None: no engine requests
        self.requests: Sequence[Request] = ()
        self.delivered = 0.0

    def follow(self, kind: str, requests: Sequence[Request]) -> None:
        self.kind, self.requests = kind, requests

    def deliver(self) -> None:
        self.delivered = perf_counter()

    def stages(self, end: float) -> tuple[float, ...] | None:
        """Seconds of each of `STAGES`, the request ending at `end`; None for a request that
        did not go through them all (refused before the engine, cancelled, failed whole)."""
        if self.kind is None or not self.delivered or not self.requests:
            return None
        last = self.requests[0]
        for r in self.requests:
            if not r.answered:
                return None
            if r.answered > last.answered:
                last = r
        if not (last.queued and last.taken):
            return None
        return (last.queued - self.start, last.taken - last.queued, last.answered - last.taken,
                self.delivered - last.answered, end - self.delivered)


def begin(scope: dict[str, Any], start: float) -> Timeline:
    """A `Timeline` for the HTTP request of `scope`, begun at `start`."""
    timeline = scope[SCOPE_KEY] = Timeline(start)
    return timeline


def follow(scope: dict[str, Any], kind: str, requests: Sequence[Request]) -> Timeline | None:
    """The request of `scope` is of `kind` and runs `requests`: its timeline (None where no
    middleware began one, e.g. an app called without it)."""
    timeline = scope.get(SCOPE_KEY)
    if timeline is not None:
        timeline.follow(kind, requests)
    return timeline


__all__ = ["STAGES", "SCOPE_KEY", "Timeline", "begin", "follow"]
