"""A request made a row (`request.Row`) before it joins a batch, or the error that answers it.

    entry = bind(bank, request)                      # the task version it is admitted with
    example = check(bank, request)                   # its input as its template's fields (`inputs.py`)
    row = prepare(bank, 0, request, max_length=None, truncate=False)   # options parsed, encoded

Everything here is about one request, alone: its task version (`bind`: an admin replacing
the task later changes nothing for it), its input and options checked, its tokens within
the model's positions (a generating row leaves its new tokens room). A failure is that
request's `Result` (`failure`); the batches, their forwards and the decode are the engine's.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

from ..architecture import ModelKind
from ..encode import EncodedRow, TokenIds
from ..errors import EncodingError, InputTooLongError, SoftPromptError
from .bank import PromptBank
from .entry import BankEntry, UnknownTaskError
from .inputs import check_token_ids, example_of, field_texts
from .request import GONE, CancelledRequestError, ErrorKind, Request, Result, Row
from .text import TASK_OPTIONS, GenerationOptions

log = logging.getLogger("softprompt.serve")


def bind(bank: PromptBank, request: Request) -> BankEntry | None:
    """Bind a request to the task version it is admitted with: its `entry`, the bank's
    entry for its task now unless it has one already (None: an unknown task)."""
    if request.entry is None:
        try:
            request.entry = bank[request.task]
        except UnknownTaskError:
            pass
    return request.entry


def failure(task: str, error: Exception, streamed: bool = False) -> Result:
    """The `Result` of a request that failed with `error` (a failure inside the model is
    logged with its traceback; a bad input is the client's)."""
    if isinstance(error, SoftPromptError):
        return Result(task, error=str(error), error_kind=ErrorKind.of(error))
    log.error("a request of task %s failed: %s", task,
              "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    message = f"{type(error).__name__}: {error}"
    return Result(task, error=f"failed mid-stream: {message}" if streamed else message,
                  error_kind=ErrorKind.FAILED)


@contextmanager
def pretokenized(checked: Sequence[tuple[BankEntry, dict[str, Any]]]) -> Iterator[None]:
    """The checked examples' texts tokenized in one batched call per tokenizer
    (`TemplateEncoder.memo_of`), the ids shared by every task's encoder on it: tasks on one
    base share its tokenizer, so a batch of 16 tasks tokenizes once, not 16 times. Only a
    speed-up: if it fails, rows encode one by one."""
    encoders: dict[int, Any] = {}
    texts: dict[int, list[str]] = {}
    for entry, example in checked:
        encoder = entry.model.encoder
        encoders[id(encoder)] = encoder
        texts.setdefault(id(encoder.tokenizer), []).extend(field_texts(entry, example))
    stack = ExitStack()
    try:
        memos: dict[int, dict] = {}
        for encoder in encoders.values():
            key = id(encoder.tokenizer)
            if key not in memos:
                memos[key] = encoder.memo_of(texts[key])
            stack.enter_context(encoder.using(memos[key]))
    except Exception as e:
        log.warning("batched tokenization failed (%s: %s); encoding the rows one by one", type(e).__name__, e)
        stack.close()
        stack = ExitStack()
    with stack:
        yield


def check(bank: PromptBank, request: Request) -> dict[str, Any]:
    """Bind the request (`bind`) and check its input: the example of its template's fields."""
    entry = bind(bank, request)
    if entry is None:
        entry = request.entry = bank[request.task]  # UnknownTaskError names the loaded tasks
    if request.gone:
        raise CancelledRequestError(GONE)
    if isinstance(request.input, TokenIds):
        check_token_ids(request.input, bank.vocabulary_size)
    return example_of(entry, request.input)


def prepare(bank: PromptBank, index: int, request: Request, *, max_length: int | None, truncate: bool) -> Row:
    """The request, checked (`check`: cheap, so `Engine.run` checks twice rather than carry
    the examples), as a row with its bound entry (`index`: its place in the run, -1 for a
    request admitted into a running decode)."""
    example = check(bank, request)
    entry = request.entry
    options = GenerationOptions.parse(request.options)
    if not request.generate and entry.task is None:
        raise SoftPromptError(f"task {entry.name!r} has no task head (its folder has no task.json): "
                              "use it for completions")
    if not request.generate:  # a generating task decodes with its own settings
        options = GenerationOptions.parse(entry.task.generate_options(), known=TASK_OPTIONS) \
            if entry.task.generates else None
    else:
        options.check_vocabulary(bank.vocabulary_size)
    if request.echo and (not request.generate or len(entry.model.template.fields) != 1):
        raise SoftPromptError(f"echo lists a completion's prompt tokens: task {entry.name!r} has template fields "
                              f"{list(entry.model.template.fields)}; echo takes a template of one text field")
    if request.generate and options.max_new_tokens == 0 and not request.echo:
        raise SoftPromptError("max_new_tokens 0 generates nothing: ask for 1 or more (0 only with echo)")
    if request.generate and options.logprobs is not None and entry.model.spec.kind is not ModelKind.CAUSAL:
        raise SoftPromptError(f"generation option logprobs: task {entry.name!r} runs on an encoder-decoder "
                              f"({entry.model.spec.model_type}), whose generation reports no log-probabilities "
                              "here; leave logprobs out")
    encoded = encode_row(entry, example, options, index if index >= 0 else None, max_length=max_length,
                         truncate=truncate)
    if not encoded.input_ids:  # refused here, before it joins a batch it would read padding in
        raise EncodingError("the input has no tokens: an empty input through a template with no other text, "
                            "virtual tokens or special tokens gives the model nothing to read")
    # before batches are cut: rows grouped by prefix length must have their final entry
    return Row(index, request, entry.for_row(encoded), example, encoded, options)


def encode_row(entry: BankEntry, example: dict[str, Any], options: GenerationOptions | None, index: int | None, *,
               max_length: int | None, truncate: bool) -> EncodedRow:
    """Encode a row; a causal LM's generating row must leave its new tokens room in
    the model's positions (with `truncate`, its input is cut to leave it)."""
    encoder = entry.model.encoder
    room = encoder.max_length  # the model's positions less a deep prompt's (None: no limit known)
    if options is None or room is None or entry.model.spec.kind is not ModelKind.CAUSAL:
        return encoder.encode(example, max_length=max_length, index=index, truncate=truncate)
    new = options.sampling(None).max_new_tokens
    if truncate and room - new >= 1:
        max_length = min(room - new, max_length or room)
    encoded = encoder.encode(example, max_length=max_length, index=index, truncate=truncate)
    if len(encoded.input_ids) + new > room:
        deep = f" (with its deep prompt's {encoder.deep_tokens})" if encoder.deep_tokens else ""
        used = len(encoded.input_ids) + encoder.deep_tokens
        raise InputTooLongError(
            f"the prompt takes {used} positions{deep} and max_new_tokens asks for {new} more: {used + new} is over "
            f"the {entry.model.spec.max_positions} positions the model has; shorten the prompt or ask for at most "
            f"{max(room - len(encoded.input_ids), 0)} new tokens")
    return encoded


__all__ = ["bind", "check", "prepare", "encode_row", "pretokenized", "failure"]
