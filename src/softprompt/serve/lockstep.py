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
             | a run raised: "failed" ---------------------------> | ends that run, if still in it
             | at shutdown "stop" -------------------------------> | returns

The engine is deterministic given its requests: the same rows join the same decode steps
on every process, and logits are identical on every process (the split forward gathers
them), so greedy rows pick the same tokens. What is not a function of the requests is made
one before they are sent:

- Seeds. A row without a seed draws fresh entropy when it becomes a decode row
  (`GenerationOptions.sampling`); rank 0 parses each request's options and fixes a seed
  (`wire.pin_options`) before sending them, so every process draws the same tokens
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
process group of their own (`wire.Channel`): the split forward's collectives (NCCL on GPUs) never
mix with them, and a follower may wait for the next request for days (`wire.IDLE`).

Reading a task runs no collective (the base's identity, which a prompt folder is checked
against, is computed once by every process at start: `architecture.base_identity`), so each
process reads tasks when it needs them: rank 0 a lazily served task when a request is
submitted, the others when their run reaches it. A cached leading segment
(`prompt_cache.py`) is a forward of the split base: computed at a message, never when a
bank reads the task (`PromptBank(cache_prompts=False)`, see `launch`). Rank 0 binds the
requests of each message to their entries, names in the message the tasks whose lead no
process holds yet, and every process computes those, in that order, then hands each
request's entry its lead before the engine sees the request (`prompt_cache.LockstepLeads`).

Failures. The engine answers a request that fails with its error and goes on, on every
process alike: the same requests fail in the same way everywhere. What escapes rank 0's
`Engine.run` (a bug) is sent as ``failed``: a follower still waiting inside that run for
its next message (its decode's admit hook) ends the run there (`RankZeroFailed`) and waits
for the next; rank 0 raises it on, and the `Batcher` answers the run's requests with it, as
the single process does. Each ``admitted`` carries rank 0's count of decode steps: a follower
whose decode has run a different number (rank 0 alone retried a batch, or failed a step) is
out of step (`OutOfStep`) and exits, and torchrun ends the launch, rather than decode other
rows than rank 0. A follower blocked in a collective forward that rank 0 never reaches waits
for the process group's timeout.

What cannot be mirrored is refused by `launch`: ``--admin`` (a task added or removed would
have to reach every process at the same point) and ``--ray``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable

from ..errors import ConfigError
from .engine import Engine
from .entry import BankEntry
from .prepare import bind, failure
from .prompt_cache import LockstepLeads
from .request import Admit, Request, Result
from .text import TokenStream
from .wire import Channel, from_wire, pin_options, to_wire

log = logging.getLogger("softprompt.serve")

class _Unwind(BaseException):
    """Ends a follower's engine run from inside it (its admit hook). Not an Exception: the
    engine catches every Exception to fail one request, or one decode's rows, and go on
    (`Engine._guarded`, `Decoder._admitted`), and this is no request's failure."""


class RankZeroFailed(_Unwind):
    """Rank 0's run raised (a ``failed`` message): the follower's run ends too."""


class OutOfStep(_Unwind):
    """A message that does not fit what this process is doing: it exits."""


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
                                   on_result=_quiet(client.on_result), entry=client.entry,
                                   queued=client.queued))


def _quiet(on_result: Callable[[Result], None] | None) -> Callable[[Result], None] | None:
    """A client's result callback that never raises: raised inside the engine on rank 0
    alone, it would fail (and retry) a batch there alone."""
    if on_result is None:
        return None

    def hand(result: Result) -> None:
        try:
            on_result(result)
        except Exception:
            log.exception("a result could not be handed to its client")

    return hand


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


def _bound(bank, requests: list[Request]) -> list[BankEntry]:
    """The entries the requests are bound to (`prepare.bind`: a pinned one, or the bank's
    now; the bank computes no lead, so a read runs no forward); one that cannot be bound
    (an unknown task, an unreadable folder) fails in the run, the same on every process."""
    entries = []
    for request in requests:
        try:
            entry = bind(bank, request)
        except Exception:
            entry = None
        if entry is not None:
            entries.append(entry)
    return entries


def latch(request: Request) -> None:
    """The engine's request is cancelled from now on (its stream too)."""
    request.cancelled.set()
    if request.stream is not None:
        request.stream.cancel()


class LockstepEngine:
    """Rank 0's engine: `Engine`'s interface (everything but `run` is the inner engine's),
    each `run` and each admission of its decode sent to the other processes first.

    Args:
        engine: this process's engine (on the split base; its bank computes no leads).
        channel: the messages' group (`Channel`).
    """

    def __init__(self, engine: Engine, channel: Channel):
        self.engine = engine
        self.channel = channel
        self.leads = LockstepLeads(engine.bank.max_in_memory)
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
                ran = [s.engine for s, _ in sent]
                leads = self.leads.missing(_bound(self.engine.bank, ran))
                self.channel.send({"kind": "run", "admit": admit is not None, "requests": [w for _, w in sent],
                                   "gone": self._latch_gone(), "leads": leads})
                try:
                    _attach(self.leads, self.engine.bank, ran, leads, self.channel)
                    results = iter(self.engine.run(ran, admit=None if admit is None else self._admitting(admit)))
                except BaseException as e:
                    self._fail(e)
                    raise
                return [e if isinstance(e, Result) else next(results) for e in entries]
            finally:
                self._depth -= 1
                if not self._depth:
                    self._shadows.clear()

    def _fail(self, error: BaseException) -> None:
        """Tell the others that this depth's run raised (a follower waiting in it ends it)."""
        log.error("a run raised on rank 0 (%s: %s); the other processes end it too", type(error).__name__, error)
        try:
            self.channel.send({"kind": "failed", "depth": self._depth})
        except Exception:
            log.exception("the other processes could not be told")

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
            sent = [(e, _quiet(on_result)) for e, on_result in entries if not isinstance(e, Result)]
            joining = [s.engine for (s, _), _ in sent]
            leads = self.leads.missing(_bound(self.engine.bank, joining))
            self.channel.send({"kind": "admitted", "requests": [w for (_, w), _ in sent], "gone": self._latch_gone(),
                               "leads": leads, "step": self.engine.decoder.steps})
            _attach(self.leads, self.engine.bank, joining, leads, self.channel)
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


def _attach(leads: LockstepLeads, bank, requests: list[Request], computed: list[str], channel: Channel) -> None:
    """Every process, at a message: the leads it names computed, agreed on by every process
    (one that failed anywhere is left out everywhere: `Channel.any`), and each request's
    entry given its task's (`LockstepLeads.attach`)."""
    try:
        leads.attach(_bound(bank, requests), computed, agree=channel.any)
    except RuntimeError as e:  # raised by `attach` only where this process lacks what rank 0 has
        raise OutOfStep(str(e)) from None
    if computed:
        log.info("rank %d cached the leading segment of %s", channel.rank, ", ".join(map(repr, computed)))


# -- ranks > 0 ----------------------------------------------------------------------------
class _Follower:
    """A process > 0 mirroring rank 0's engine calls (`follow`)."""

    def __init__(self, engine: Engine, channel: Channel):
        self.engine, self.channel = engine, channel
        self.leads = LockstepLeads(engine.bank.max_in_memory)
        self.requests: dict[int, Request] = {}  # the outermost run's requests, by id
        self.depth = 0

    def loop(self) -> None:
        while True:
            message = self.channel.receive()
            if message["kind"] == "stop":
                return
            if message["kind"] == "failed":  # a run that ended here already (or failed here too)
                continue
            if message["kind"] != "run":
                raise OutOfStep(f"out of step with rank 0: {message['kind']!r} while no run is in flight")
            self.run(message)

    def run(self, message: dict[str, Any]) -> None:
        self.depth += 1
        try:
            requests = self._take(message)
            _attach(self.leads, self.engine.bank, requests, message["leads"], self.channel)
            self.engine.run(requests, admit=self._admit if message["admit"] else None)
        except RankZeroFailed:
            log.warning("rank 0's run raised: this process ended it too")
        except Exception:  # raised here alone, rank 0 goes on: its next message says so (`OutOfStep`)
            log.exception("a run raised on rank %d", self.channel.rank)
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
            if message["kind"] == "failed":
                if message["depth"] > self.depth:  # that nested run ended here already
                    continue
                raise RankZeroFailed()
            if message["kind"] != "admitted":
                raise OutOfStep(f"out of step with rank 0: {message['kind']!r} while a decode admits rows")
            if message["step"] != self.engine.decoder.steps:
                raise OutOfStep(f"out of step with rank 0: its decode ran {message['step']} steps, this process's "
                                f"{self.engine.decoder.steps}")
            joining = self._take(message)
            _attach(self.leads, self.engine.bank, joining, message["leads"], self.channel)
            return [(request, _nowhere) for request in joining]


def _nowhere(result: Result) -> None:
    """A follower's results go nowhere: rank 0 answers the clients."""


def follow(engine: Engine, channel: Channel) -> None:
    """Ranks > 0: run what rank 0's `LockstepEngine` runs, until it says stop.

    Raises:
        OutOfStep: a message that does not fit this process's work (the launch must end).
    """
    _Follower(engine, channel).loop()


__all__ = ["LockstepEngine", "follow", "RankZeroFailed", "OutOfStep"]
