"""Serving a base split by tensor parallelism: every process runs the same engine in lockstep.

Under ``torchrun --nproc_per_node N softprompt serve --tensor-parallel`` each process holds
1/N of the base (transformers' ``tp_plan="auto"``), so every forward is collective: all N
processes must run the same forwards, in the same order, over the same rows. As vLLM's
driver worker does for its tensor-parallel workers, rank 0 alone takes requests (HTTP and the
`Batcher`) and tells the others what to run; each of them builds the same bank and `Engine`
and mirrors rank 0's engine call by call (`follow`).

    rank 0:  Batcher -> LockstepEngine.run(requests, admit)      ranks > 0:  follow(engine)
             | "run" [requests]  ------------------------------> | Engine.run(requests, admit=next messages)
             | between decode steps, admit() -> "admitted" ----> | admit() returns those requests
             |   (a nested run inside admit: "run" first) -----> |   (runs it, then waits on)
             | at shutdown "stop" -------------------------------> | returns

The engine is deterministic given its requests: the same rows join the same decode steps
on every process, and logits are identical on every process (the split forward gathers
them), so greedy rows pick the same tokens. What is not a function of the requests is made
one before they are sent:

- Seeds. A row without a seed draws fresh entropy when it becomes a decode row
  (`GenerationOptions.sampling`); rank 0 parses each request's options and fixes a seed
  (`pin_options`) before sending them, so every process draws the same tokens
  (`sampling.py`: a row's draws depend only on its seed, its token count and its logits).
- Cancellation. A client may go at any moment, and a decode checks `Request.gone` at every
  step (`decode._drop_cancelled`) and a row's text stops early when its stream is cancelled
  (`text.RowText.done`): read on each process at a different moment, that would end a row
  after different steps. So the engines never see the client's request: they run a shadow
  (`_Shadow`) whose `cancelled` event and stream are set only at a message. Rank 0 sends,
  with every message, the ids of the requests whose client went since the last one, and
  every process (rank 0 included) latches exactly those, after the same decode step. The
  shadow's stream hands its pieces, and its `on_result` the result, to the client's
  request: only on rank 0; the others' results go nowhere.

A run's requests carry ids counted on rank 0; a process forgets them when its outermost run
returns (an admitted request lives as long as the decode it joined).

Messages are JSON (never pickle: rank 0 parses requests from clients; JSON keeps what is
sent plain data) in a uint8 tensor, its length first, broadcast from rank 0 over a gloo
process group of their own (`Channel`): the split forward's collectives (NCCL on GPUs) never
mix with them, and a follower may wait for the next request for days (`IDLE`).

What cannot be mirrored is refused by `launch`: ``--admin`` (a task added or removed would
have to reach every process at the same point) and ``--ray``. Tasks are read without a
cached leading segment (`PromptBank(cache_prompts=False)`, see `launch`), so reading a task
runs no forward of the base: rank 0 reads a lazily served task when a request is submitted,
the others when the run reaches it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..encode import TokenIds
from ..errors import ConfigError
from .engine import Engine
from .prepare import failure
from .request import Admit, Request, Result
from .sampling import fresh_seed
from .text import GenerationOptions, TokenStream

log = logging.getLogger("softprompt.serve")

#: how long a follower waits for rank 0's next message (an idle server sends none)
IDLE = timedelta(days=365)
#: the options a follower gets for a request whose options rank 0 could not parse: refused there too
_REFUSED = {"options rank 0 refused": True}


class Channel:
    """JSON messages broadcast from rank 0 to every process of the launch, over a gloo
    group of their own (made by every process, in the same order: a collective)."""

    def __init__(self, timeout: timedelta = IDLE):
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def send(self, message: dict[str, Any]) -> None:
        """Rank 0: broadcast `message` (its length, then its UTF-8 JSON bytes)."""
        data = json.dumps(message, allow_nan=False).encode()
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src=0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)

    def receive(self) -> dict[str, Any]:
        """Ranks > 0: the next message rank 0 sends."""
        length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src=0, group=self.group)
        data = torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        return json.loads(data.numpy().tobytes().decode())


# -- requests as plain data ---------------------------------------------------------------
def pin_options(options: dict[str, Any] | GenerationOptions) -> dict[str, Any] | GenerationOptions:
    """The options parsed, with a seed fixed where none was given (every process then draws
    the same tokens); options that do not parse are returned as they are (the request fails
    on every process before it reaches the model)."""
    try:
        parsed = GenerationOptions.parse(options)
    except Exception:
        return options
    return parsed if parsed.seed is not None else dataclasses.replace(parsed, seed=fresh_seed())


def _value(x: Any) -> Any:
    """An input as JSON: what JSON would lose (token ids vs a list of words, tuples, a
    mapping of fields) is tagged; strings, numbers, booleans and None stay."""
    if isinstance(x, TokenIds):
        return {"token_ids": list(x)}
    if isinstance(x, (list, tuple)):
        return {"list" if isinstance(x, list) else "tuple": [_value(v) for v in x]}
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise ConfigError(f"an input's field names must be strings to reach every process: {list(x)!r}")
        return {"fields": {k: _value(v) for k, v in x.items()}}
    if x is None or isinstance(x, (str, int, bool)) or (isinstance(x, float) and math.isfinite(x)):
        return x  # JSON has no NaN nor infinity
    raise ConfigError(f"an input of type {type(x).__name__}: a tensor-parallel server sends its inputs to every "
                      "process, as text, numbers, lists, objects of fields or token ids")


def _unvalue(x: Any) -> Any:
    if not isinstance(x, dict):
        return x
    (tag, v), = x.items()
    if tag == "token_ids":
        return TokenIds(int(i) for i in v)
    if tag == "fields":
        return {k: _unvalue(u) for k, u in v.items()}
    return (list if tag == "list" else tuple)(_unvalue(u) for u in v)


def to_wire(request: Request, rid: int) -> dict[str, Any]:
    """A request (its options pinned: `pin_options`) as plain data, under the id `rid`."""
    options = request.options
    return {"id": rid, "task": request.task, "input": _value(request.input), "generate": request.generate,
            "echo": request.echo, "stream": request.stream is not None,
            "options": dataclasses.asdict(options) if isinstance(options, GenerationOptions) else None}


def from_wire(data: dict[str, Any]) -> tuple[int, Request]:
    """`to_wire`'s request back (its id, and a request whose stream, if it had one, goes
    nowhere)."""
    options = data["options"]
    if options is None:
        parsed: dict[str, Any] | GenerationOptions = dict(_REFUSED)
    else:  # JSON made the tuples lists; logit_bias's token ids stay ints (pairs, not a mapping)
        parsed = GenerationOptions(**{**options, "stop": tuple(options["stop"]),
                                      "logit_bias": tuple((int(t), float(b)) for t, b in options["logit_bias"])})
    stream = TokenStream(lambda text, logprobs: None) if data["stream"] else None
    return data["id"], Request(data["task"], _unvalue(data["input"]), generate=data["generate"], options=parsed,
                               stream=stream, echo=data["echo"])


# -- rank 0 -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Shadow:
    """A client's request and the request the engine runs in its place, whose cancellation
    is latched at a message (see the module docstring)."""

    client: Request
    engine: Request

    @classmethod
    def of(cls, client: Request) -> "_Shadow":
        stream = None
        if client.stream is not None:
            stream = TokenStream(lambda text, logprobs, c=client.stream: _forward(c, text, logprobs))
        return cls(client, Request(client.task, client.input, generate=client.generate,
                                   options=pin_options(client.options), stream=stream, echo=client.echo,
                                   on_result=client.on_result, entry=client.entry, submitted=client.submitted))


def _forward(stream: TokenStream, text: str, logprobs) -> None:
    """A shadow stream's piece to the client's stream. Never raises: a stream that failed on
    rank 0 alone would end its row there alone."""
    if stream.cancelled:
        return
    stream.emitted = True
    try:
        stream.on_text(text, logprobs)
    except Exception:
        log.exception("a stream's piece could not be handed to its client")


def latch(request: Request) -> None:
    """The engine's request is cancelled from now on (its stream too)."""
    request.cancelled.set()
    if request.stream is not None:
        request.stream.cancel()


class LockstepEngine:
    """Rank 0's engine: `Engine`'s interface (everything but `run` is the inner engine's),
    each `run` and each admission of its decode sent to the other processes first.

    Args:
        engine: this process's engine (on the split base).
        channel: the messages' group (`Channel`).
    """

    def __init__(self, engine: Engine, channel: Channel):
        self.engine = engine
        self.channel = channel
        self._lock = threading.RLock()  # one run at a time (nested ones on its thread); `stop` waits for it
        self._ids = 0
        self._shadows: dict[int, _Shadow] = {}  # the outermost run's requests, by id
        self._depth = 0
        self._stopped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, requests, admit: Admit | None = None) -> list[Result]:
        """`Engine.run`, mirrored by every process (see the module docstring)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the tensor-parallel processes were stopped")
            self._depth += 1
            try:
                entries = [self._register(r, r.on_result) for r in requests]
                sent = [e for e in entries if not isinstance(e, Result)]
                self.channel.send({"kind": "run", "admit": admit is not None, "requests": [w for _, w in sent],
                                   "gone": self._latch_gone()})
                results = iter(self.engine.run([s.engine for s, _ in sent],
                                               admit=None if admit is None else self._admitting(admit)))
                return [e if isinstance(e, Result) else next(results) for e in entries]
            finally:
                self._depth -= 1
                if not self._depth:
                    self._shadows.clear()

    def _register(self, request: Request, on_result: Callable[[Result], None] | None
                  ) -> tuple[_Shadow, dict[str, Any]] | Result:
        """The request's shadow and what is sent of it, under a new id; or, for a request
        that cannot be sent (an input that is not plain data), its failure, handed to
        `on_result` too: it fails alone, run by no process."""
        shadow = _Shadow.of(request)
        try:
            wire = to_wire(shadow.engine, self._ids + 1)
        except ConfigError as e:
            result = failure(request.task, e)
            if on_result is not None:
                on_result(result)
            return result
        self._ids += 1
        self._shadows[self._ids] = shadow
        return shadow, wire

    def _latch_gone(self) -> list[int]:
        """The ids of the requests whose client went since the last message, latched."""
        gone = [rid for rid, s in self._shadows.items() if s.client.gone and not s.engine.cancelled.is_set()]
        for rid in gone:
            latch(self._shadows[rid].engine)
        return gone

    def _admitting(self, admit: Admit) -> Admit:
        def admitted(room: int) -> list[tuple[Request, Callable[[Result], None]]]:
            chosen: list[tuple[Request, Callable[[Result], None]]] = []
            try:
                chosen = list(admit(room))  # may run head requests: a nested `run`, sent before this
            except Exception:  # the decoder would go on without new rows: so do the others
                log.exception("the admit hook failed; decoding goes on without new rows")
            entries = [(self._register(request, on_result), on_result) for request, on_result in chosen]
            sent = [(e, on_result) for e, on_result in entries if not isinstance(e, Result)]
            self.channel.send({"kind": "admitted", "requests": [w for (_, w), _ in sent], "gone": self._latch_gone()})
            return [(s.engine, on_result) for (s, _), on_result in sent]

        return admitted

    def stop(self, timeout: float = 60.0) -> None:
        """Tell the other processes to return from `follow` (once the run in flight, if any,
        has ended: at most `timeout` seconds)."""
        if not self._lock.acquire(timeout=timeout):  # a message now would interleave with the run's
            log.error("a run still holds the engine after %.0f s: the other processes are not told to stop", timeout)
            return
        try:
            if not self._stopped:
                self._stopped = True
                self.channel.send({"kind": "stop"})
        finally:
            self._lock.release()


# -- ranks > 0 ----------------------------------------------------------------------------
class _Follower:
    """A process > 0 mirroring rank 0's engine calls (`follow`)."""

    def __init__(self, engine: Engine, channel: Channel):
        self.engine, self.channel = engine, channel
        self.requests: dict[int, Request] = {}  # the outermost run's requests, by id
        self.depth = 0

    def loop(self) -> None:
        while True:
            message = self.channel.receive()
            if message["kind"] == "stop":
                return
            if message["kind"] != "run":
                raise RuntimeError(f"out of step with rank 0: {message['kind']!r} while no run is in flight")
            self.run(message)

    def run(self, message: dict[str, Any]) -> None:
        self.depth += 1
        try:
            requests = self._take(message)
            self.engine.run(requests, admit=self._admit if message["admit"] else None)
        finally:
            self.depth -= 1
            if not self.depth:
                self.requests.clear()

    def _take(self, message: dict[str, Any]) -> list[Request]:
        """A message's requests (registered by id), after latching the ones whose client went."""
        taken = [from_wire(data) for data in message["requests"]]
        self.requests.update(taken)
        for rid in message["gone"]:
            latch(self.requests[rid])
        return [request for _, request in taken]

    def _admit(self, room: int) -> list[tuple[Request, Callable[[Result], None]]]:
        while True:
            message = self.channel.receive()
            if message["kind"] == "run":  # rank 0's admit ran head requests first
                self.run(message)
                continue
            if message["kind"] != "admitted":
                raise RuntimeError(f"out of step with rank 0: {message['kind']!r} while a decode admits rows")
            return [(request, _nowhere) for request in self._take(message)]


def _nowhere(result: Result) -> None:
    """A follower's results go nowhere: rank 0 answers the clients."""


def follow(engine: Engine, channel: Channel) -> None:
    """Ranks > 0: run what rank 0's `LockstepEngine` runs, until it says stop."""
    _Follower(engine, channel).loop()


__all__ = ["Channel", "LockstepEngine", "follow", "pin_options", "to_wire", "from_wire", "IDLE"]
