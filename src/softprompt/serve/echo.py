"""The engine's echo step: completions that echo their prompt with ``logprobs`` (what
lm-eval's loglikelihood requests send) scored before anything is generated.

    left = score_echoes(engine, rows, answer)   # the rows still to generate

Rows of many tasks share one forward per batch (`scoring.launch_scores`), under the engine's
row and token budgets (`Engine._batches`); each batch's forward is queued before the batch
before it is read, as head batches are. A row of no new token is answered with its scores;
a row of one new token takes it from the same forward's next-token scores, picked as a
prefill would pick it (`Decoder.pick_first` / `hand_first`); a batch that fails fails its
rows alone.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Callable

from ..transfer import tensor_on
from .prepare import failure
from .request import Result, Row
from .scoring import launch_scores, read_scores


def score_echoes(engine, rows: list[Row], answer: Callable[[Row, Result], None]) -> list[Row]:
    """Score the prompts of the rows that echo with logprobs (`scoring.launch_scores`:
    rows of many tasks in one forward, batches under the engine's budgets, each
    batch's forward queued before the batch before is read, as head batches are); a
    row that asks for no new token or one (picked from the same forward's next-token
    scores: `Decoder.pick_first`), or whose batch failed, is answered here
    (`answer(row, result)`); the rows left to generate are returned."""
    scoring = [r for r in rows if r.request.echo and r.options.logprobs is not None]
    answered: set[int] = set()

    def fail(batch: list[Row], error: Exception) -> None:
        for r in batch:
            if id(r) not in answered:
                answer(r, failure(r.entry.name, error))
                answered.add(id(r))

    pending = None
    for batch in itertools.chain(engine._batches(scoring), [None]):
        launched = None
        if batch is not None:
            try:
                launched = _launch(engine, batch, answer)
            except Exception as e:  # its rows fail alone: the other batches and the generation go on
                fail(batch, e)
        if pending is not None:
            try:
                _read(engine, *pending, answered)
            except Exception as e:
                fail(pending[0], e)
        pending = None if launched is None else (batch, *launched)
    left = []
    for r in rows:
        if id(r) in answered:
            continue
        if r.options.max_new_tokens == 0:  # scored only: nothing to generate
            answer(r, Result(r.entry.name, output="", **r.counts, finish_reason="length",
                             logprobs=[] if r.options.logprobs is not None else None, **r.echoed))
        else:
            left.append(r)
    return left


def _launch(engine, batch: list[Row], answer: Callable[[Row, Result], None]):
    """Queue a batch's scoring forward, and the picking of the token of its rows of one
    new token (their decode rows made here: their results are built when they end)."""
    ones = [(r, engine._decode_row(r, partial(answer, r))) for r in batch if r.options.max_new_tokens == 1]
    at = [b for b, r in enumerate(batch) if r.options.max_new_tokens == 1]
    then = None
    if ones:  # the rows picked out with a pinned index: a plain one would wait for the forward
        then = lambda scores: engine.decoder.pick_first(  # noqa: E731
            [d for _, d in ones], scores.index_select(0, tensor_on(at, scores.device)))
    return launch_scores(engine.bank, [(r.entry, r.encoded) for r in batch], max(r.options.logprobs for r in batch),
                         then), ones


def _read(engine, batch: list[Row], launched, ones: list, answered: set[int]) -> None:
    """A launched batch's prompt scores into its rows, and its rows of one new token answered."""
    scores = read_scores(launched)
    for r, entries in zip(batch, scores.prompt):  # each row keeps its own k of the batch's largest
        r.echo = entries.with_k(r.options.logprobs)
    if ones:  # a failure before the first row is handed its token leaves them all to `fail`
        engine.decoder.hand_first([d for _, d in ones], scores.carried)
        answered.update(id(r) for r, _ in ones)


__all__ = ["score_echoes"]
