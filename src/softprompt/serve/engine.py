"""The engine: requests of many tasks in, answers out, in mixed-task batches.

    engine = Engine(bank)
    engine.classify("sentiment", ["a gem of a film"])        # [{"label": ..., "scores": {...}}]
    engine.generate("summarise", ["..."], max_new_tokens=32)  # ["..."]
    engine.run([Request("sentiment", "great"), Request("ner", "Paris is nice"), ...])

`run` validates every request on its own before it joins a batch (an unknown task, an
input of the wrong type, text that is not valid Unicode, an over-long input: that request
alone fails, with its `ErrorKind`; `prepare.py` makes a request a row), then cuts the
rest into batches under a row and token budget: requests read by a task head share one
forward of the base model (`forward_mixed`), each task's head then reads its rows; generation requests with the same
token budget and end of sequence share one `generate_mixed` (each row sampling with its
own settings and random stream). A batch that fails as a whole is retried request by
request, so one poisoned request cannot fail its neighbours; in a decode a row that fails
fails alone (`decode.py`).

A request is bound to the task version it was admitted with (`Request.entry`, `bind`):
every later step (head or generation, encoding, the forward's prompts) uses that entry,
never the task's name, so an admin replacing or removing the task meanwhile changes
nothing for it.

The engine works on tokens and asks each task what it can do (`Task.generates`,
`Task.word_field`): text around generation (options, stop strings, streams) is `text.py`'s,
HTTP status codes are the app's.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from contextlib import ExitStack
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from ..architecture import ModelKind
from ..errors import SoftPromptError
from .bank import PromptBank
from .decode import Decoder
from .decode_row import DecodeRow
from .echo import score_echoes
from .entry import BankEntry, UnknownTaskError
from .heads import HeadForwards, Pending
from .inputs import example_of
from .mixed import collate_mixed, generate_mixed
from .prepare import bind, check, failure, prepare, pretokenized
from .request import GONE, Admit, CancelledRequestError, ErrorKind, Request, Result, Row
from .sampling import RowSampler, TokenLogprob
from .stacks import POSITIONS_FROM_CACHE
from .text import GENERATE_OPTIONS, RowText, StopRows, Streamer, TokenStream

#: the phases of a run whose host seconds `Engine.phases` counts: checking the inputs,
#: tokenizing them (one batched call), making the rows, and, for head requests, queueing a
#: batch's forward (collation, prompts, the launch) and reading its answers (the device's
#: outputs, the heads' predictions)
PHASES = ("check", "tokenize", "prepare", "launch", "read")


log = logging.getLogger("softprompt.serve")


class Engine:
    """Runs requests of many tasks on one bank.

    Args:
        bank: the tasks' prompts on the shared base model.
        max_batch_rows: most requests in one batch.
        max_batch_tokens: most padded tokens (rows x longest row) in one forward batch: a
            batch of head requests, or rows joining the decoder's running batch (the rest
            join after its next step).
        truncate: cut over-long inputs inside their fields (default: refuse them, 413).
        max_length: most tokens per row (default: the model's limit).
        compile: compile the base model's forwards: the decode step's before its CUDA graph
            is captured, the prefill's and the head requests' with dynamic shapes
            (`compiled.py`); compiled on first use, or by `warmup.warm_up`; a dict: `torch.compile`'s
            keyword arguments, with ``regional: True`` for the dynamic-shape forwards compiled
            block by block (`compiled.py`). Measured in docs/PERFORMANCE.md.
        head_graphs: pad batches of head requests to buckets and replay them from CUDA
            graphs (`graphed.HeadGraphs`; on a CPU the padded forward runs eagerly);
            default: on a CUDA device for a causal LM whose rows may be padded
            (`graphed.paddable`).
    """

    def __init__(self, bank: PromptBank, *, max_batch_rows: int = 64, max_batch_tokens: int = 16384,
                 truncate: bool = False, max_length: int | None = None, compile: bool | dict = False,
                 head_graphs: bool | None = None):
        self.bank = bank
        self.compile = compile
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.heads = HeadForwards(bank, compile=compile, graphs=head_graphs)  # the head requests' forward
        self.truncate = truncate
        self.max_length = max_length
        self.batches: list[tuple[str, int]] = []  # (kind, rows) of every batch run, for metrics
        #: host seconds spent so far in each phase of head requests' runs (`PHASES`), for
        #: metrics: where a run's time goes between the request and its answer
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._decoder: Decoder | None = None  # one for the engine's life: its slots (and CUDA graph) stay

    @property
    def decoder(self) -> Decoder:
        """The engine's decoder (causal LMs), made on first use."""
        if self._decoder is None:
            self._decoder = Decoder(self.bank, max_rows=self.max_batch_rows, compile=self.compile,
                                    max_join_tokens=self.max_batch_tokens)
        return self._decoder

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
                raise (UnknownTaskError if r.error_kind is ErrorKind.UNKNOWN_TASK else SoftPromptError)(r.error)
        return [r.output for r in results]

    # -- the work ---------------------------------------------------------------
    def run(self, requests: Sequence[Request], admit: Admit | None = None) -> list[Result]:
        """Answer every request; the results come in the order of the requests. Never
        raises: a request that fails gets a `Result` with its error.

        Args:
            admit: while a causal LM decodes, called for more generation requests when the
                running batch has room (`Batcher` hands over the requests that arrived since);
                each comes with the callback that takes its `Result`.
        """
        results = _Answers(requests)
        # tasks registered but not in memory are read side by side, not one by one as checked
        self.bank.prefetch(r.task for r in requests if r.entry is None)
        checked: list[tuple[int, Request, dict[str, Any]]] = []
        start = time.perf_counter()
        for i, request in enumerate(requests):  # every input checked before any is tokenized
            try:
                checked.append((i, request, self._check(request)))
            except Exception as e:
                results[i] = failure(request.task, e)
        self._clock("check", start)
        generating: list[Row] = []
        with ExitStack() as tokenized:
            start = time.perf_counter()  # the texts of every row tokenized in one call per tokenizer
            tokenized.enter_context(pretokenized([(request.entry, example) for _, request, example in checked]))
            self._clock("tokenize", start)
            prepared = self._prepared(checked, results)
            # head rows are cut into batches as they are prepared: the first batch's forward
            # runs while the host prepares the rest (`_run_head_batches`)
            self._run_head_batches(self._cut_as_they_come(self._set_aside(prepared, generating)), results)
        generating = score_echoes(self, generating, lambda r, result: results.__setitem__(r.index, result))
        if generating and generating[0].entry.model.spec.kind is ModelKind.CAUSAL:
            # one decode loop: rows of every task and setting, joining as others end
            self._guarded(generating, results, lambda batch: self._run_decoder(batch, admit, results), "decode")
        else:
            groups: dict[tuple, list[Row]] = {}
            for r in generating:  # rows of any sampling settings and seeds share a batch (`RowSampler`)
                groups.setdefault(r.options.batch_key, []).append(r)
            for group in groups.values():
                for batch in self._batches(group):
                    self._guarded(batch, results, self._run_generation, "generate")
        return [r if r is not None else Result("", error="not run", error_kind=ErrorKind.FAILED)
                for r in results.results]

    def _prepared(self, checked: list[tuple[int, Request, dict[str, Any]]], results: "_Answers") -> Iterator[Row]:
        """The checked requests as rows (`_prepare`), in order; a request that fails gets its
        result here and no row."""
        for i, request, _ in checked:
            start = time.perf_counter()
            try:
                row = self._prepare(i, request)
            except Exception as e:
                results[i] = failure(request.task, e)
                continue
            finally:
                self._clock("prepare", start)
            yield row

    def _clock(self, phase: str, start: float) -> None:
        """Count the host seconds since `start` (`time.perf_counter`) to `phase`."""
        self.phases[phase] += time.perf_counter() - start

    @staticmethod
    def _set_aside(rows: Iterable[Row], generating: list[Row]) -> Iterator[Row]:
        """The head rows of `rows`; the generating ones are appended to `generating`."""
        for r in rows:
            if r.generates:
                generating.append(r)
            else:
                yield r

    def bind(self, request: Request) -> BankEntry | None:
        """Bind a request to the task version it is admitted with (`prepare.bind`)."""
        return bind(self.bank, request)

    def _check(self, request: Request) -> dict[str, Any]:
        return check(self.bank, request)

    def _prepare(self, index: int, request: Request) -> Row:
        """The request as a row with its bound entry (`prepare.prepare`), or its error raised."""
        return prepare(self.bank, index, request, max_length=self.max_length, truncate=self.truncate)

    _example = staticmethod(example_of)

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        """Consecutive requests under the row and token budgets (for BART-like families, of
        one prefix length)."""
        if not rows:
            return []
        spec = rows[0].entry.model.spec
        if spec.model_type in POSITIONS_FROM_CACHE:
            by_length: dict[int, list[Row]] = {}
            for r in rows:
                by_length.setdefault(self.bank.prompt_length(r.entry), []).append(r)
            return [b for group in by_length.values() for b in self._cut(group)]
        return list(self._cut(rows))

    def _cut(self, rows: Iterable[Row]) -> Iterator[list[Row]]:
        """Consecutive rows under the row and token budgets, each batch given as soon as
        the row after it is known not to fit (or the rows end)."""
        current: list[Row] = []
        longest = 0
        for r in rows:
            padded = max(longest, r.length) * (len(current) + 1)
            if current and (len(current) >= self.max_batch_rows or padded > self.max_batch_tokens):
                yield current
                current, longest = [], 0
            current.append(r)
            longest = max(longest, r.length)
        if current:
            yield current

    def _cut_as_they_come(self, rows: Iterator[Row]) -> Iterator[list[Row]]:
        """`_batches` over rows still being prepared: cut as they come where batches are
        consecutive rows; for families whose batches group rows by prefix length, once
        all are prepared."""
        first = next(rows, None)
        if first is None:
            return iter(())
        rows = itertools.chain([first], rows)
        if first.entry.model.spec.model_type in POSITIONS_FROM_CACHE:
            return iter(self._batches(list(rows)))
        return self._cut(rows)

    def _guarded(self, batch: list[Row], results: "_Answers", work, kind: str, alone=None) -> None:
        """Run `work` on the batch; if it fails as a whole, run each request alone (those
        not answered yet: a decode answers its rows as they end) with `alone` (default:
        `work`)."""
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
                                                    error_kind=ErrorKind.FAILED)
                        continue
                    self._guarded([row], results, alone or work, kind)
                return
            log.error("request %d (%s) failed: %s", batch[0].index, batch[0].entry.name, traceback.format_exc())
            results[batch[0].index] = Result(batch[0].entry.name, error=f"{type(e).__name__}: {e}",
                                             error_kind=ErrorKind.of(e))

    def _run_head_batches(self, batches: Iterable[list[Row]], results: "_Answers") -> None:
        """Answer batches of head requests, each batch's forward queued (`_launch_heads`)
        before the answers of the batch before are read (`_read_heads`).

        Why: reading a batch's answers is host work (a device read per task group, the
        heads' predictions, the results), and so is collating the next batch; run one after
        the other, the GPU waits through both between two forwards (S2 on an H200: 47 of
        179 ms, `bench.probe.heads`). Queued first, the next forward runs while they are
        done (graphed batches replay on their own stream: `HeadGraphs.launch`). A batch
        whose launch or read fails is answered as before: whole, then request by request.
        """
        pending: tuple[list[Row], Pending] | None = None
        for batch in itertools.chain(batches, [None]):  # batches may still be coming: see `run`
            launched = None
            if batch is not None:
                try:
                    launched = self._launch_heads(batch)
                except Exception:  # answered below, guarded, once the batch before is read
                    launched = None
            if pending is not None:
                rows, launched_rows = pending
                self._guarded(rows, results, lambda b, p=launched_rows: self._read_heads(b, p), "forward",
                              alone=self._run_heads)
            if batch is not None and launched is None:
                self._guarded(batch, results, self._run_heads, "forward")
            pending = None if launched is None else (batch, launched)

    def _run_heads(self, batch: list[Row]) -> list[Result]:
        return self._read_heads(batch, self._launch_heads(batch))

    def _launch_heads(self, batch: list[Row]) -> Pending:
        start = time.perf_counter()
        try:  # the entries each row was checked with, not the names: see `PromptBank.entry`
            return self.heads.launch([r.entry for r in batch], [r.encoded for r in batch])
        finally:
            self._clock("launch", start)

    def _read_heads(self, batch: list[Row], pending: Pending) -> list[Result]:
        start = time.perf_counter()
        try:
            outputs = self.heads.read(pending, [r.entry for r in batch], [r.example for r in batch])
            return [Result(r.entry.name, output=o, **r.counts) for r, o in zip(batch, outputs)]
        finally:
            self._clock("read", start)

    def generates(self, request: Request) -> bool:
        """Whether a request generates text (a completion, or a task whose head generates)."""
        entry = self.bind(request)  # its own version's head decides, not the task's name now
        return request.generate or (entry is not None and entry.task is not None and entry.task.generates)

    def _decode_row(self, r: Row, on_result: Callable[[Result], None] | None = None) -> DecodeRow:
        """A request as a decoder row: its sampling settings, stop strings and stream; the
        `Result` is built when the row finishes (and handed to `on_result`)."""
        tokenizer = self.bank.tokenizer
        sampling = r.options.sampling(tokenizer.eos_token_id)  # its own random stream (seeded, or fresh entropy)
        logprobs: list[TokenLogprob] = []  # the decoder appends, the text's stream sends them with its pieces
        text = RowText(tokenizer, None, r.options.stop, r.request.stream, decode=r.task_decode,
                       logprobs=logprobs if sampling.logprobs is not None else None)

        def done(row: DecodeRow) -> None:
            row.result = self._decoded(r, row, text, sampling.max_new_tokens)
            if on_result is not None:
                on_result(row.result)

        return DecodeRow(r.entry.name, r.example, sampling, on_token=text.add, on_done=done, encoded=r.encoded,
                         entry=r.entry, cancelled=lambda: r.request.gone, logprobs=logprobs,
                         eos_logprob=r.request.echo)

    def _decoded(self, r: Row, row: DecodeRow, text: RowText, max_new_tokens: int) -> Result:
        """A finished decode row's `Result`: its text, or why it failed (that row alone:
        `DecodeRow.error`) or stopped early (its client gone)."""
        if row.error is not None:
            stream = r.request.stream
            return failure(r.entry.name, row.error, streamed=stream is not None and stream.emitted)
        if r.request.gone:
            return Result(r.entry.name, error=GONE, error_kind=ErrorKind.CANCELLED, **r.counts,
                          new_tokens=len(row.tokens))
        text.flush()  # a last multi-byte character cut short: as the whole decoding gives it
        ran_out = len(row.tokens) >= max_new_tokens and not text.stopped
        return Result(r.entry.name, output=text.text, **r.counts, new_tokens=len(row.tokens),
                      finish_reason="length" if ran_out else "stop",
                      logprobs=list(row.logprobs) if row.sampling.logprobs is not None else None, **r.echoed)

    def _run_decoder(self, batch: list[Row], admit: Admit | None = None,
                     answers: "_Answers | None" = None) -> list[Result]:
        """Causal LMs: continuous batching (`decode.py`); per-row settings, stop strings,
        streams; requests from `admit` join the running batch."""
        joined: list[tuple[DecodeRow, Callable[[Result], None]]] = []

        def more(room: int) -> list[DecodeRow]:
            prepared: list[Row] = []
            answers: dict[int, Callable[[Result], None]] = {}
            for request, on_result in admit(room):
                try:  # whatever fails, fails this request alone: the decode goes on
                    row = self._prepare(-1, request)
                except Exception as e:
                    on_result(failure(request.task, e))
                    continue
                prepared.append(row)
                answers[id(row)] = on_result
            rows = []
            for r in score_echoes(self, prepared, lambda r, result: answers[id(r)](result)):
                try:
                    row = self._decode_row(r, answers[id(r)])
                except Exception as e:
                    answers[id(r)](failure(r.entry.name, e))
                    continue
                joined.append((row, answers[id(r)]))
                rows.append(row)
            return rows

        # each row answered when it ends: the loop runs on while new rows keep joining
        decode_rows = [self._decode_row(r, None if answers is None else partial(answers.__setitem__, r.index))
                       for r in batch]
        try:
            self.decoder.run(decode_rows, admit=more if admit else None)
        except Exception as e:  # the rows that joined have no other way to hear of it
            for row, on_result in joined:
                if getattr(row, "result", None) is None:
                    on_result(Result(row.task, error=f"{type(e).__name__}: {e}", error_kind=ErrorKind.FAILED))
            raise
        return [d.result for d in decode_rows]

    def _run_generation(self, batch: list[Row]) -> list[Result]:
        """Encoder-decoders: one `generate()` for the batch (rows share `batch_key`), each row
        sampling with its own settings and stream (`RowSampler`), its own stop strings."""
        options = batch[0].options  # the batch's budget and end of sequence
        encoded = collate_mixed(self.bank, [r.entry for r in batch], [r.encoded for r in batch])
        tokenizer = self.bank.tokenizer
        eos = options.eos_token_id if options.eos_token_id is not None else tokenizer.eos_token_id
        decoders = [RowText(tokenizer, eos, r.options.stop, r.request.stream, decode=r.task_decode) for r in batch]
        sampler = RowSampler([r.options.sampling(eos) for r in batch])
        new = generate_mixed(self.bank, encoded, streamer=Streamer(decoders),
                             stopping_criteria=StoppingCriteriaList([StopRows(decoders)]),
                             logits_processor=LogitsProcessorList([sampler]), **options.generate_kwargs())  # (B, N)
        results = []
        for r, tokens, text, finite in zip(batch, new, decoders, sampler.finite_per_row()):
            if not finite:  # its tokens mean nothing: this row fails, the others stand
                results.append(Result(r.entry.name, error="the model's scores for this input are not finite "
                                      "(NaN or infinity): nothing to sample from", error_kind=ErrorKind.FAILED))
                continue
            text.finish(tokens.tolist())
            results.append(Result(r.entry.name, output=text.text, **r.counts, new_tokens=text.count,
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

    def __setitem__(self, i: int, result: Result | None) -> None:
        if self.results[i] is not None or result is None:  # None: a row whose answer could not be built
            return
        self.results[i] = result
        callback = self.requests[i].on_result
        if callback is not None:
            callback(result)


__all__ = ["Engine", "PHASES", "Request", "Result", "ErrorKind", "CancelledRequestError", "TokenStream", "GENERATE_OPTIONS"]
