"""A row of the decode loop (`decode.py`) and what happens to it at each token.

The loop decides when rows join, step and leave their slots; what a row is, how its next
token is picked from a step's scores (its own sampling settings and random stream,
`sampling.py`), and how the token is handed to it (end of sequence, budget, its callbacks
raising, non-finite scores: each ends this row alone) are the row's, and live here. The
prefill, the decode step and `Decoder.pick_first` all pick and hand tokens through these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..encode import EncodedRow
from .sampling import Draws, NonFiniteScoresError, Sampling, TokenLogprob, adjusted, sample, token_logprobs

log = logging.getLogger(__package__ + ".decode")  # the decode loop's logger, which reported rows before they moved here


@dataclass
class DecodeRow:
    """A row to generate: its task, example, settings, and a sink for its tokens.

    Attributes:
        on_token: called with each new token id; returns True when the row is done (a stop
            string, a client gone) even before its end-of-sequence token or budget.
        on_done: called once with the row when it has finished (or failed, or stopped).
        cancelled: whether the row's client has gone: it stops before the next step.
        error: why the row failed alone (None: it did not), when `on_done` is called.
    """

    task: str
    example: dict[str, Any]
    sampling: Sampling
    on_token: Callable[[int], bool] = lambda token: False
    on_done: Callable[["DecodeRow"], None] | None = None
    tokens: list[int] = field(default_factory=list)
    result: Any = None  # what on_done made of the row (the engine's Result)
    encoded: EncodedRow | None = None  # the row already encoded by its task (else encoded here)
    entry: Any = None  # the task's BankEntry when the row was checked (pinned: see PromptBank.entry)
    cancelled: Callable[[], bool] = lambda: False
    error: Exception | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, where `sampling.logprobs` asks
    eos_logprob: bool = False  # the end-of-sequence token's too, when it ends the row (echo: lm-eval reads it)


def pick_tokens(logits: torch.Tensor, rows: Sequence[DecodeRow | None], greedy: torch.Tensor | None = None,
                drawn: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits of `rows` (None: an empty slot) -> (B,) next tokens (arg-max for greedy
    rows, each sampling row's own draw for its next token index) and a (B,) bool mask, False
    where a row's scores were not finite (`sampling.sample`); `greedy`: the arg-max, if known;
    `drawn`: per row, tokens drawn on the device that the row has not received yet."""
    drawn = drawn or [0] * len(rows)
    samplings = [None if r is None else r.sampling for r in rows]
    draws = Draws.of(samplings, [0 if r is None else len(r.tokens) + d for r, d in zip(rows, drawn)], logits.device)
    if any(s is not None and s.adjusts for s in samplings):  # penalties and biases: the arg-max changes too
        logits = adjusted(logits, samplings, [[] if r is None else r.tokens for r in rows])
        greedy = None
    return sample(logits, draws, greedy)


def top_k(rows: Sequence[DecodeRow | None]) -> int | None:
    """The most top log-probabilities a row of the step asks for (None: no row asks)."""
    return max((r.sampling.logprobs for r in rows if r is not None and r.sampling.logprobs is not None), default=None)


def row_logprobs(rows: Sequence[DecodeRow | None], tokens: list[int], table: torch.Tensor | None
                 ) -> list[TokenLogprob | None]:
    """Each row's `TokenLogprob` of its token (None where it does not ask), from the step's
    (B, 1 + 2k) table (`sampling.logprobs_of`; None: no row asks)."""
    if table is None:
        return [None] * len(rows)
    return token_logprobs([None if r is None else r.sampling for r in rows], tokens, table.tolist())


def hand_token(row: DecodeRow, token: int, finite: bool, logprob: TokenLogprob | None) -> bool:
    """Hand `row` its new token; True when it is done (its `error` set if it failed)."""
    if not finite:
        row.error = NonFiniteScoresError("the model's next-token scores for this row are not finite (NaN or "
                                         "infinity): the row was stopped")
        return True
    try:
        return emit_token(row, token, logprob)
    except Exception as e:  # its stream, stop strings or task decoding: this row's alone
        row.error = e
        return True


def emit_token(row: DecodeRow, token: int, logprob: TokenLogprob | None = None) -> bool:
    """Hand a row its new token; True when the row is done."""
    s = row.sampling
    if s.eos_token_id is not None and token == s.eos_token_id:
        if logprob is not None and row.eos_logprob:
            row.logprobs.append(logprob)
        return True
    if logprob is not None:  # before `on_token`: a stream's piece carries its tokens' log-probabilities
        row.logprobs.append(logprob)
    row.tokens.append(token)
    return bool(row.on_token(token)) or len(row.tokens) >= s.max_new_tokens


def report_done(row: DecodeRow) -> None:
    """Tell the row's `on_done` it has ended; its failure is logged, never raised."""
    if row.on_done is None:
        return
    try:
        row.on_done(row)
    except Exception:  # the caller's own callback: the other rows go on
        log.exception("on_done of a decode row of task %s failed", row.task)


__all__ = ["DecodeRow", "pick_tokens", "top_k", "row_logprobs", "hand_token", "emit_token", "report_done"]
