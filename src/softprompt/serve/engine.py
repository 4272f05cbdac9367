"""The engine: requests of many tasks in, answers out, in mixed-task batches.

    engine = Engine(bank)
    engine.classify("sentiment", ["a gem of a film"])        # [{"label": ..., "scores": {...}}]
    engine.generate("summarise", ["..."], max_new_tokens=32)  # ["..."]
    engine.run([Request("sentiment", "great"), Request("ner", "Paris is nice"), ...])

`run` validates every request on its own (an unknown task, a bad input or an over-long
one fails that request alone, with an HTTP-like status), then cuts the rest into batches
under a row and token budget: requests read by a task head share one forward of the base
model (`forward_mixed`), each task's head then reads its rows; generation requests with
the same sampling settings share one `generate_mixed`. A batch that fails as a whole is
retried request by request, so one poisoned request cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import threading
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..architecture import ModelKind
from ..encode import EncodedRow
from ..errors import EncodingError, InputTooLongError, SoftPromptError
from ..tasks import Generation
from .bank import POSITIONS_FROM_CACHE, BankEntry, PromptBank, UnknownTaskError
from .decode import Decoder, DecodeRow, Sampling
from .mixed import collate_mixed, forward_mixed, generate_mixed, output_rows, rows_of

log = logging.getLogger("softprompt.serve")

#: generation options a request may set (transformers `generate` names), and `stop`.
GENERATE_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "stop")


Admit = Callable[[int], list[tuple["Request", Callable[["Result"], None]]]]


class TokenStream:
    """A generating request's text as it is produced: `on_text` receives each new piece
    (called from the engine's thread); `cancel()` (a client gone) stops the row at the
    next step."""

    def __init__(self, on_text: Callable[[str], None]):
        self.on_text = on_text
        self.emitted = False  # a piece went out: the row cannot be run again from the start
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class Request:
    """One input for one task.

    Attributes:
        task: a task name of the bank.
        input: a text (fills the template's only field; split into words for NER) or an
            object of the template's fields.
        generate: generate text (completions) instead of reading the task's head.
        options: generation options (`GENERATE_OPTIONS`).
        stream: receives the generated text piece by piece.
        on_result: called (on the engine's thread) with the request's `Result` as soon as
            it is ready, before `Engine.run` returns: the `Batcher` answers its caller
            then, not when the whole run (which may decode for as long as new rows keep
            joining) ends.
    """

    task: str
    input: Any
    generate: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    stream: TokenStream | None = None
    on_result: Callable[[Result], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class Result:
    """The answer to one request: `output` (the task's prediction, or the generated text),
    or `error` with an HTTP-like `status` (404 unknown task, 413 input too long, 422 bad
    input, 500 failure inside the model)."""

    task: str
    output: Any = None
    error: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str | None = None  # generation: "stop" (end of sequence or a stop string) or "length"

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Row:
    index: int
    request: Request
    entry: BankEntry
    example: dict[str, Any]
    encoded: EncodedRow  # the row as checked: batches collate it, nothing is encoded twice

    @property
    def length(self) -> int:
        return len(self.encoded.input_ids)


class Engine:
    """Runs requests of many tasks on one bank.

    Args:
        bank: the tasks' prompts on the shared base model.
        max_batch_rows: most requests in one batch.
        max_batch_tokens: most padded tokens (rows x longest row) in one forward batch.
        truncate: cut over-long inputs inside their fields (default: refuse them, 413).
        max_length: most tokens per row (default: the model's limit).
    """

    def __init__(self, bank: PromptBank, *, max_batch_rows: int = 64, max_batch_tokens: int = 16384,
                 truncate: bool = False, max_length: int | None = None):
        self.bank = bank
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.truncate = truncate
        self.max_length = max_length
        self.batches: list[tuple[str, int]] = []  # (kind, rows) of every batch run, for metrics
        self._decoder: Decoder | None = None  # one for the engine's life: its slots (and CUDA graph) stay

    # -- convenience ----------------------------------------------------------
    def classify(self, task: str, inputs: Sequence[Any]) -> list[Any]:
        """The task head's prediction for each input (label and scores; tags for NER).

        Raises:
            SoftPromptError (UnknownTaskError, EncodingError, ...): the first failed input.
        """
        return self._outputs(self.run([Request(task, x) for x in inputs]))

    def generate(self, task: str, prompts: Sequence[Any], **options) -> list[str]:
        """Generated text for each prompt with the task's prompt (`GENERATE_OPTIONS`)."""
        return self._outputs(self.run([Request(task, x, generate=True, options=options) for x in prompts]))

    @staticmethod
    def _outputs(results: list[Result]) -> list[Any]:
        for r in results:
            if not r.ok:
                raise (UnknownTaskError if r.status == 404 else SoftPromptError)(r.error)
        return [r.output for r in results]

    # -- the work ---------------------------------------------------------------
    def run(self, requests: Sequence[Request], admit: Admit | None = None) -> list[Result]:
        """Answer every request; the results come in the order of the requests.

        Args:
            admit: while a causal LM decodes, called for more generation requests when the
                running batch has room (`Batcher` hands over the requests that arrived since);
                each comes with the callback that takes its `Result`.
        """
        results = _Answers(requests)
        rows: list[_Row] = []
        with self._pretokenized(requests):
            for i, request in enumerate(requests):
                try:
                    rows.append(self._prepare(i, request))
                except SoftPromptError as e:
                    results[i] = Result(request.task, error=str(e), status=_status(e))
        heads = [r for r in rows if not self._generates(r)]
        for batch in self._batches(heads):
            self._guarded(batch, results, self._run_heads, "forward")
        generating = [r for r in rows if self._generates(r)]
        if generating and generating[0].entry.model.spec.kind is ModelKind.CAUSAL:
            # one decode loop: rows of every task and setting, joining as others end
            self._guarded(generating, results, lambda batch: self._run_decoder(batch, admit, results), "decode")
        else:
            groups: dict[tuple, list[_Row]] = {}
            for r in generating:
                groups.setdefault(_options_key(self._generation_options(r)), []).append(r)
            for group in groups.values():
                for batch in self._batches(group):
                    self._guarded(batch, results, self._run_generation, "generate")
        return [r if r is not None else Result("", error="not run", status=500) for r in results.results]

    @contextmanager
    def _pretokenized(self, requests: Sequence[Request]) -> Iterator[None]:
        """Each task's text inputs tokenized in one batched call (`TemplateEncoder.pretokenized`)."""
        texts: dict[str, list[str]] = {}
        encoders = {}
        for request in requests:
            values = request.input.values() if isinstance(request.input, dict) else [request.input]
            entry = self._lookup(request.task)
            if entry is not None:
                encoders.setdefault(request.task, entry.model.encoder)
                texts.setdefault(request.task, []).extend(v for v in values if isinstance(v, str))
        with ExitStack() as stack:
            for task, values in texts.items():
                stack.enter_context(encoders[task].pretokenized(values))
            yield

    def _lookup(self, task: str) -> BankEntry | None:
        """The task's entry, or None: one lookup, not `in` then `[]`, which an admin's
        DELETE in between turns into an exception that fails every request of the run."""
        try:
            return self.bank[task]
        except UnknownTaskError:
            return None

    def _prepare(self, index: int, request: Request) -> _Row:
        entry = self.bank[request.task]
        example = self._example(entry, request.input)
        unknown = sorted(set(request.options) - set(GENERATE_OPTIONS))
        if unknown:
            raise SoftPromptError(f"unknown generation option(s) {unknown}; known: {list(GENERATE_OPTIONS)}")
        if not request.generate and entry.task is None:
            raise SoftPromptError(f"task {entry.name!r} has no task head (its folder has no task.json): "
                                  "use it for completions")
        encoded = entry.model.encoder.encode(example, max_length=self.max_length, index=index, truncate=self.truncate)
        if not encoded.input_ids:  # refused here, before it joins a batch it would read padding in
            raise EncodingError("the input has no tokens: an empty input through a template with no other text, "
                                "virtual tokens or special tokens gives the model nothing to read")
        # before batches are cut: rows grouped by prefix length must have their final entry
        return _Row(index, request, entry.for_row(encoded), example, encoded)

    @staticmethod
    def _example(entry: BankEntry, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise SoftPromptError(f"an input is a text or an object of fields, got {type(value).__name__}")
        fields = entry.model.template.fields
        if len(fields) != 1:
            raise SoftPromptError(f"task {entry.name!r} has template fields {list(fields)}: send an object with them")
        words = getattr(entry.task, "field", None) == fields[0]  # a token-classification task reads words
        return {fields[0]: value.split() if words else value}

    @staticmethod
    def _generates(row: _Row) -> bool:
        return row.request.generate or isinstance(row.entry.task, Generation)

    @staticmethod
    def _generation_options(row: _Row) -> dict[str, Any]:
        if row.request.generate:
            return dict(row.request.options)
        return row.entry.task.generate_options()

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Consecutive requests under the row and token budgets (for BART-like families, of
        one prefix length)."""
        if not rows:
            return []
        spec = rows[0].entry.model.spec
        if spec.model_type in POSITIONS_FROM_CACHE:
            by_length: dict[int, list[_Row]] = {}
            for r in rows:
                by_length.setdefault(self.bank.prompt_length(r.entry), []).append(r)
            return [b for group in by_length.values() for b in self._cut(group)]
        return self._cut(rows)

    def _cut(self, rows: list[_Row]) -> list[list[_Row]]:
        batches: list[list[_Row]] = []
        current: list[_Row] = []
        longest = 0
        for r in rows:
            padded = max(longest, r.length) * (len(current) + 1)
            if current and (len(current) >= self.max_batch_rows or padded > self.max_batch_tokens):
                batches.append(current)
                current, longest = [], 0
            current.append(r)
            longest = max(longest, r.length)
        if current:
            batches.append(current)
        return batches

    def _guarded(self, batch: list[_Row], results: "_Answers", work, kind: str) -> None:
        """Run `work` on the batch; if it fails as a whole, run each request alone (those
        not answered yet: a decode answers its rows as they end)."""
        try:
            for row, result in zip(batch, work(batch)):
                results[row.index] = result
            self.batches.append((kind, len(batch)))
        except Exception as e:  # a failure inside the model: isolate the request that causes it
            if len(batch) > 1:
                log.warning("a %s batch of %d failed (%s); retrying its requests one by one", kind, len(batch), e)
                for row in batch:
                    stream = row.request.stream
                    if results[row.index] is not None:
                        continue
                    if stream is not None and stream.emitted:  # run again, its client would get the text twice
                        results[row.index] = Result(row.entry.name, error=f"failed mid-stream: {type(e).__name__}: {e}",
                                                    status=500)
                        continue
                    self._guarded([row], results, work, kind)
                return
            log.error("request %d (%s) failed: %s", batch[0].index, batch[0].entry.name, traceback.format_exc())
            status = _status(e) if isinstance(e, SoftPromptError) else 500
            results[batch[0].index] = Result(batch[0].entry.name, error=f"{type(e).__name__}: {e}", status=status)

    def _run_heads(self, batch: list[_Row]) -> list[Result]:
        # the entries each row was checked with, not the names: see `PromptBank.entry`
        encoded = collate_mixed(self.bank, [r.entry for r in batch], [r.encoded for r in batch])
        entries = {id(r.entry): r.entry for r in batch}
        tasks = [e.task for e in entries.values()]
        reads = {"output_hidden_states": any(t.reads.get("output_hidden_states") for t in tasks),
                 "logits": "answer" if any(t.reads.get("logits") == "answer" for t in tasks) else "none"}
        out = forward_mixed(self.bank, encoded, **reads)
        results: list[Result | None] = [None] * len(batch)
        for key, entry in entries.items():
            mine = [i for i, r in enumerate(batch) if id(r.entry) == key]
            sub = rows_of(encoded, mine)
            entry.task.annotate(sub, [batch[i].example for i in mine])
            predictions = entry.task.predict(entry.model, sub, output_rows(out, mine))
            for i, p in zip(mine, predictions):
                results[i] = Result(entry.name, output=p, prompt_tokens=batch[i].length)
        return results

    def generates(self, request: Request) -> bool:
        """Whether a request generates text (a completion, or a task whose head generates)."""
        entry = self._lookup(request.task)
        return request.generate or (entry is not None and isinstance(entry.task, Generation))

    def _decode_row(self, r: _Row, on_result: Callable[[Result], None] | None = None) -> DecodeRow:
        """A request as a decoder row: its sampling settings, stop strings and stream; the
        `Result` is built when the row finishes (and handed to `on_result`)."""
        tokenizer = self.bank.tokenizer
        options = self._generation_options(r)
        stop = options.pop("stop", None)
        seed = options.pop("seed", None)
        if seed is not None:
            torch.manual_seed(int(seed))
        sampling = Sampling.from_options(options, tokenizer.eos_token_id)
        task = r.entry.task if isinstance(r.entry.task, Generation) and not r.request.generate else None
        text = _RowText(tokenizer, None, [stop] if isinstance(stop, str) else [x for x in (stop or []) if x],
                        r.request.stream, task=task)

        def done(row: DecodeRow) -> None:
            row.result = Result(r.entry.name, output=text.text, prompt_tokens=r.length, new_tokens=len(row.tokens),
                                finish_reason="length" if len(row.tokens) >= sampling.max_new_tokens and not text.stopped
                                else "stop")
            if on_result is not None:
                on_result(row.result)

        return DecodeRow(r.entry.name, r.example, sampling, on_token=_sink(text), on_done=done, encoded=r.encoded,
                         entry=r.entry)

    def _run_decoder(self, batch: list[_Row], admit: Admit | None = None,
                     answers: "_Answers | None" = None) -> list[Result]:
        """Causal LMs: continuous batching (`decode.py`); per-row settings, stop strings,
        streams; requests from `admit` join the running batch."""
        joined: list[tuple[DecodeRow, Callable[[Result], None]]] = []

        def more(room: int) -> list[DecodeRow]:
            rows = []
            for request, on_result in admit(room):
                try:
                    row = self._decode_row(self._prepare(-1, request), on_result)
                except SoftPromptError as e:
                    on_result(Result(request.task, error=str(e), status=_status(e)))
                    continue
                joined.append((row, on_result))
                rows.append(row)
            return rows

        # each row answered when it ends: the loop runs on while new rows keep joining
        decode_rows = [self._decode_row(r, None if answers is None else partial(answers.__setitem__, r.index))
                       for r in batch]
        try:
            if self._decoder is None:
                self._decoder = Decoder(self.bank, max_rows=self.max_batch_rows)
            self._decoder.run(decode_rows, admit=more if admit else None)
        except Exception as e:  # the rows that joined have no other way to hear of it
            for row, on_result in joined:
                if getattr(row, "result", None) is None:
                    on_result(Result(row.task, error=f"{type(e).__name__}: {e}", status=500))
            raise
        return [d.result for d in decode_rows]

    def _run_generation(self, batch: list[_Row]) -> list[Result]:
        options = self._generation_options(batch[0])
        stop = options.pop("stop", None)
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        seed = options.pop("seed", None)
        if seed is not None:
            torch.manual_seed(int(seed))
        if options.get("temperature") is not None and "do_sample" not in options:
            options["do_sample"] = float(options["temperature"]) > 0
        if options.get("temperature") == 0:
            options.pop("temperature")
        encoded = collate_mixed(self.bank, [r.entry for r in batch], [r.encoded for r in batch])
        tokenizer = self.bank.tokenizer
        eos = options.get("eos_token_id", tokenizer.eos_token_id)
        decoders = [_RowText(tokenizer, eos, stops, r.request.stream,
                             task=r.entry.task if isinstance(r.entry.task, Generation) and not r.request.generate
                             else None) for r in batch]
        new = generate_mixed(self.bank, encoded, streamer=_Streamer(decoders),
                             stopping_criteria=StoppingCriteriaList([_StopRows(decoders)]), **options)  # (B, N)
        results = []
        for r, tokens, text in zip(batch, new, decoders):
            text.finish(tokens.tolist())
            results.append(Result(r.entry.name, output=text.text, prompt_tokens=r.length, new_tokens=text.count,
                                  finish_reason="stop" if text.stopped else "length"))
        return results


class _Answers:
    """A run's results, in the order of its requests; each is handed to its request's
    `on_result` the moment it is set. The first answer stays (a decode row is answered
    when it ends, and again, the same, when the decode returns)."""

    def __init__(self, requests: Sequence[Request]):
        self.requests = requests
        self.results: list[Result | None] = [None] * len(requests)

    def __getitem__(self, i: int) -> Result | None:
        return self.results[i]

    def __setitem__(self, i: int, result: Result) -> None:
        if self.results[i] is not None:
            return
        self.results[i] = result
        callback = self.requests[i].on_result
        if callback is not None:
            callback(result)


class _RowText:
    """One generating row's text: decoded as tokens arrive, cut at its end-of-sequence token
    or a stop string, handed piece by piece to its stream."""

    def __init__(self, tokenizer, eos: int | None, stops: list[str], stream: TokenStream | None, task=None):
        self.tokenizer, self.eos, self.stops, self.stream, self.task = tokenizer, eos, stops, stream, task
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # end of sequence or a stop string

    @property
    def done(self) -> bool:
        return self.stopped or (self.stream is not None and self.stream.cancelled)

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, token: int) -> None:
        if self.done:
            return
        if self.eos is not None and token == self.eos:
            self.stopped = True
            return
        self.ids.append(token)
        self._update()

    def _update(self) -> None:
        if self.task is not None:  # a generation task's own decoding (its eos, stripped)
            text = self.task.decode(self.tokenizer, torch.tensor([self.ids]))[0]
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            if s in text:
                text, self.stopped = text[: text.index(s)], True
        if text.startswith(self.text) and len(text) > len(self.text) and not text.endswith("\ufffd"):
            piece, self.text = text[len(self.text):], text  # a piece: wait for whole characters
            if self.stream is not None and not self.stream.cancelled:
                self.stream.emitted = True
                self.stream.on_text(piece)
        elif not text.startswith(self.text):  # re-tokenised text changed earlier characters: keep the new
            self.text = text

    def finish(self, tokens: list[int]) -> None:
        """After generate(): the same tokens (a row that never streamed) decoded at once."""
        if not self.ids and not self.stopped:
            for t in tokens:
                self.add(t)
                if self.done:
                    break


class _Streamer(BaseStreamer):
    """generate()'s streamer for a batch: the first call is the prompt, then one (B,)
    tensor of new tokens a step, handed to each row."""

    def __init__(self, rows: list[_RowText]):
        self.rows = rows
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt (or the decoder's start tokens)
            self.first = False
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            row.add(int(token))

    def end(self) -> None:
        pass


class _StopRows(StoppingCriteria):
    """Per-row stop: a stop string was produced, or the row's client went away."""

    def __init__(self, rows: list[_RowText]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _sink(text: "_RowText") -> Callable[[int], bool]:
    def take(token: int) -> bool:
        text.add(token)
        return text.done

    return take


def _options_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def _status(error: Exception) -> int:
    if isinstance(error, UnknownTaskError):
        return 404
    if isinstance(error, InputTooLongError):
        return 413
    return 422


__all__ = ["Engine", "Request", "Result", "TokenStream", "GENERATE_OPTIONS"]
