"""What goes into the engine and what comes out: a `Request` (one input for one task), its
`Result` (the answer, or why it failed: `ErrorKind`), and the `Row` a checked request
becomes on its way through a batch."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..encode import EncodedRow
from ..errors import InputTooLongError, SoftPromptError
from .entry import BankEntry, UnknownTaskError
from .sampling import TokenLogprob
from .scoring import PromptLogprobs
from .text import GenerationOptions, TokenStream

GONE = "cancelled: the client went away"

Admit = Callable[[int], list[tuple["Request", Callable[["Result"], None]]]]


class CancelledRequestError(SoftPromptError):
    """The request's client has gone (`Request.cancelled`, `TokenStream.cancel`)."""


class ErrorKind(enum.Enum):
    """Why a request failed (the HTTP app maps each to a status code)."""

    UNKNOWN_TASK = "unknown task"
    INPUT_TOO_LONG = "input too long"
    BAD_INPUT = "bad input"  # a malformed input or option, or one the task cannot take
    FAILED = "failed"  # a failure inside the model
    CANCELLED = "cancelled"  # its client has gone
    SHUTTING_DOWN = "shutting down"  # the server stopped before it was answered

    @classmethod
    def of(cls, error: Exception) -> "ErrorKind":
        if isinstance(error, UnknownTaskError):
            return cls.UNKNOWN_TASK
        if isinstance(error, CancelledRequestError):
            return cls.CANCELLED
        if isinstance(error, InputTooLongError):
            return cls.INPUT_TOO_LONG
        return cls.BAD_INPUT if isinstance(error, SoftPromptError) else cls.FAILED


@dataclass
class Request:
    """One input for one task.

    Attributes:
        task: a task name of the bank.
        input: a text (fills the template's only field; split into words for NER),
            `TokenIds` (fill the only field as they are) or an object of the template's fields.
        generate: generate text (completions) instead of reading the task's head.
        options: generation options by name (`GENERATE_OPTIONS`, read by
            `GenerationOptions.parse`), or parsed already.
        stream: receives the generated text piece by piece.
        echo: a completion that also scores its prompt: with `logprobs` in its options, its
            `Result.prompt_logprobs` holds each of the prompt's own tokens' log-probability
            (`scoring.score_prompts`); ``max_new_tokens`` 0 (set on parsed options: the
            parser takes 1 and more) scores without generating.
        on_result: called (on the engine's thread) with the request's `Result` as soon as
            it is ready, before `Engine.run` returns: the `Batcher` answers its caller
            then, not when the whole run (which may decode for as long as new rows keep
            joining) ends.
        entry: the task version the request was admitted with (the HTTP app binds it when
            it checks the endpoint); None: bound when it is admitted (`Batcher.submit`,
            `Engine.run`: see `Engine.bind`). A task replaced or removed afterwards does
            not change what answers it.
        cancelled: set when its client has gone (a closed connection): the request is
            dropped if it is still waiting, or stops at the next decode step (see `gone`).
    """

    task: str
    input: Any
    generate: bool = False
    options: dict[str, Any] | GenerationOptions = field(default_factory=dict)
    stream: TokenStream | None = None
    echo: bool = False
    on_result: Callable[[Result], None] | None = field(default=None, repr=False, compare=False)
    entry: BankEntry | None = field(default=None, repr=False, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    # when it was queued, taken by the batcher's worker and answered (the batcher's clock:
    # `time.perf_counter`; 0: not yet), written by the `Batcher`, read by `timeline.Timeline`
    # and by the batcher's time share (how long the oldest head request has waited)
    queued: float = field(default=0.0, repr=False, compare=False)
    taken: float = field(default=0.0, repr=False, compare=False)
    answered: float = field(default=0.0, repr=False, compare=False)

    @property
    def gone(self) -> bool:
        """Its client has gone: `cancelled` is set, or its stream was cancelled
        (`TokenStream.cancel`); the one test of both, wherever a request may stop."""
        return self.cancelled.is_set() or (self.stream is not None and self.stream.cancelled)


@dataclass
class Result:
    """The answer to one request: `output` (the task's prediction, or the generated text),
    or `error` with its `error_kind`."""

    task: str
    output: Any = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    prompt_tokens: int = 0  # the request's own tokens the model read (the template's text and its input)
    virtual_tokens: int = 0  # its task's virtual tokens besides (in the row, or a deep prompt's per layer)
    new_tokens: int = 0
    finish_reason: str | None = None  # generation: "stop" (end of sequence or a stop string) or "length"
    logprobs: list[TokenLogprob] | None = None  # generation with `logprobs` asked: one per new token
    # echo with `logprobs`: the prompt's own tokens (`scoring.field_ids`) and theirs (None for the first)
    prompt_ids: list[int] | None = None
    prompt_logprobs: Sequence[TokenLogprob | None] | None = None  # a `scoring.PromptLogprobs`

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Row:
    """A request checked and encoded (`Engine._prepare`), ready to join a batch: its place
    in the run, its bound entry, its example, its encoded row and parsed options."""

    index: int
    request: Request
    entry: BankEntry
    example: dict[str, Any]
    encoded: EncodedRow  # the row as checked: batches collate it, nothing is encoded twice
    options: GenerationOptions | None  # None: read by the task's head
    echo: PromptLogprobs | None = None  # its prompt's scores (`Request.echo` with logprobs)

    @property
    def length(self) -> int:
        return len(self.encoded.input_ids)

    @property
    def echoed(self) -> dict[str, Any]:
        """The `Result` fields of its prompt's scores (none unless it echoes with logprobs)."""
        if self.echo is None:
            return {}
        return {"prompt_ids": self.echo.tokens, "prompt_logprobs": self.echo}  # its field's tokens, as scored

    @property
    def counts(self) -> dict[str, int]:
        """The row's `Result` token counts: its own tokens, and the virtual tokens of its
        task (an input prompt's slots in the row; a deep prompt's length per layer)."""
        slots = sum(1 for p in self.encoded.prompt_index if p >= 0)
        deep = self.entry.model.num_virtual_tokens if self.entry.model.deep else 0
        return {"prompt_tokens": self.length - slots, "virtual_tokens": slots + deep}

    @property
    def generates(self) -> bool:
        return self.options is not None

    @property
    def task_decode(self):
        """A generating task's own decoding of its tokens (None: a completion)."""
        return None if self.request.generate else self.entry.task.decode


__all__ = ["Request", "Result", "Row", "ErrorKind", "CancelledRequestError", "GONE", "Admit"]
