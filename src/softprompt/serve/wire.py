"""What rank 0 of a tensor-parallel server sends the other processes (`lockstep.py`):
messages as JSON over a gloo group of their own (`Channel`), and requests as plain data
(`to_wire` / `from_wire`), their options pinned first (`pin_options`).

JSON, never pickle: rank 0 parses requests from clients, and JSON keeps what is sent plain
data. A follower may wait for the next message for days (`IDLE`): an idle server sends none.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..encode import TokenIds
from ..errors import ConfigError
from .request import Request
from .sampling import fresh_seed
from .text import GenerationOptions, TokenStream

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

    def any(self, flags: list[bool]) -> list[bool]:
        """Every process, at the same point: each flag set where it is set on any process
        (what every process must then agree on, e.g. a lead that failed somewhere)."""
        mine = torch.tensor([int(f) for f in flags], dtype=torch.uint8)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(f) for f in mine.tolist()]


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


__all__ = ["Channel", "IDLE", "pin_options", "to_wire", "from_wire"]
