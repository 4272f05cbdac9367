"""Prompt scoring: the log-probability of each of a prompt's own tokens given the tokens
before it, under its task's prompt (OpenAI's ``echo`` with ``logprobs``: what lm-eval's
loglikelihood tasks read).

    scores = score_prompts(bank, [(entry, encoded), ...], k=1)
    scores.prompt[b][0]   # None: the first of the prompt's tokens has nothing of the prompt before it
    scores.prompt[b][j]   # TokenLogprob(token, log p(token | everything before it), k best)
    scores.next_token[b]  # (V,) the scores of the token after the row: its first generated one

"A prompt's own tokens" are its field's tokens in the encoded row (`field_index`): never
the virtual tokens, nor the template's own text around the field. Token j's score comes
from the model's output at the real token before it (the row's previous real position:
virtual slots are taken out of the output, `forward.SoftPromptOutput`), so the template's
text, the input prompt's virtual tokens and a deep prompt's prefix all condition it, as
in the row's own forward. Rows of many tasks share one forward (`forward_mixed`).

The forward keeps the last-layer states and computes no (B, T, V) logits: the LM head runs
only at the scored positions, gathered over the rows and taken a chunk at a time
(`loss.lm_head`), so memory stays at one chunk's scores whatever the rows' lengths and
the vocabulary. The same forward gives each row's next-token scores (its last column, as a
prefill does): a request of one new token (lm-eval sends ``max_tokens: 1``) is answered
from them without a prefill of its own (`Decoder.pick_first`, `echo.py`).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Sequence

import torch

from ..encode import EncodedRow
from ..loss import lm_head
from ..transfer import tensor_on, to_host
from .bank import PromptBank
from .entry import BankEntry
from .mixed import collate_mixed, forward_mixed
from .sampling import TokenLogprob, logprobs_of

#: most fp32 scores (positions x vocabulary) one chunk of the LM head holds: 1 GiB
CHUNK_SCORES = 2**28


class PromptLogprobs(SequenceABC):
    """One row's prompt scores, as a sequence of N entries (N: its field's tokens): None
    for the first, then each token's `TokenLogprob` with its k best, built when read.

    The scores stay in the rows of the batch's one host copy (`table`, the
    (n, 1 + 2K) rows of `sampling.logprobs_of`): lm-eval's requests list hundreds of
    tokens each, and an object per token, made on the engine's thread while the GPU
    waits, cost as much as the forward that scored them. The API's ``logprobs`` read the
    rows as they lie (`logprobs.echo_logprobs`).
    """

    __slots__ = ("tokens", "table", "start", "k")

    def __init__(self, tokens: list[int], table: list[list[float]], start: int, k: int):
        self.tokens, self.table, self.start, self.k = tokens, table, start, k

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(i)
        if j == 0:
            return None
        v = self.table[self.start + j - 1]
        K = (len(v) - 1) // 2
        return TokenLogprob(self.tokens[j], v[0], [(int(v[1 + K + t]), v[1 + t]) for t in range(self.k)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceABC) and list(self) == list(other)

    def with_k(self, k: int) -> "PromptLogprobs":
        """The same scores with at most `k` best tokens an entry (a row's own k of its batch's)."""
        return PromptLogprobs(self.tokens, self.table, self.start, min(k, self.k))


@dataclass
class PromptScores:
    """What one scoring forward gives its B rows.

    Attributes:
        prompt: per row, one entry per token of its field (`PromptLogprobs`): None for the
            first, then each token's `TokenLogprob` with the k most likely tokens.
        next_token: (B, V) each row's scores for the token after it (its last column).
    """

    prompt: list[PromptLogprobs]
    next_token: torch.Tensor
    carried: tuple = ()  # host copies of what `launch_scores`'s ``then`` queued


@dataclass
class LaunchedScores:
    """A scoring forward queued on the device whose scores the host has not read yet.

    Attributes:
        fields: per row, its field's tokens.
        table: (N, 1 + 2k) the scores (`sampling.logprobs_of`); on a GPU a pinned host copy,
            valid once `ready` has passed.
        next_token: (B, V) each row's next-token scores, on the device.
        carried: host copies of what `launch_scores`'s ``then`` queued, with the table.
    """

    fields: list[list[int]]
    table: torch.Tensor
    k: int
    next_token: torch.Tensor
    ready: "torch.cuda.Event | None"
    carried: tuple = ()


def launch_scores(bank: PromptBank, rows: Sequence[tuple[BankEntry, EncodedRow]], k: int,
                  then=None) -> LaunchedScores:
    """Queue the scoring of every row's field tokens (its task's template has one field)
    in one forward of the rows together, with `k` top log-probabilities at each position
    (0: none), and the copy of the scores to the host; nothing waits for the device after
    the forward's own start (`read_scores` does). ``then(next_token)``: more device work on
    the (B, V) next-token scores whose tensors come back to the host with the table."""
    batch = collate_mixed(bank, [e for e, _ in rows], [r for _, r in rows])
    fields = [field_ids(row) for _, row in rows]
    flat = [t for tokens in fields for t in tokens[1:]]
    out = forward_mixed(bank, batch, logits="last", output_hidden_states=True)
    hidden, field = out.last_hidden_state, out.field_index == 0  # (B, T, D), (B, T): aligned on the real tokens
    # token t + 1 of a field is scored from the output at t (the field is contiguous in the
    # real tokens): every field token but a row's first, in row-major order; their count is
    # known on the host, so finding them does not wait for the forward
    scored = field[:, 1:] & field[:, :-1]
    rows_at, before = torch.nonzero_static(scored, size=len(flat), fill_value=0).unbind(1)
    states = hidden[rows_at, before]  # (N, D)
    chosen = tensor_on(flat, states.device)  # pinned: a plain copy would wait for the forward
    chunk = max(1, CHUNK_SCORES // bank.vocabulary_size)
    table = torch.cat([logprobs_of(lm_head(bank.base, states[i: i + chunk]), chosen[i: i + chunk], k)
                       for i in range(0, len(flat), chunk)]) if flat else torch.empty(0, 1 + 2 * k)
    # a collated row's field tokens are its field positions; the check rides with the copy
    count = scored.sum().view(1).float()
    next_token = out.logits[:, -1]
    carried = tuple(then(next_token)) if then is not None else ()
    if not table.is_cuda:
        return LaunchedScores(fields, table, k, next_token, None, (count, *carried))
    host = tuple(None if x is None else to_host(x) for x in (table, count, *carried))
    ready = torch.cuda.Event()
    ready.record()
    return LaunchedScores(fields, host[0], k, next_token, ready, host[1:])


def read_scores(launched: LaunchedScores) -> PromptScores:
    """The scores of a `launch_scores` (waits for its copy to the host)."""
    if launched.ready is not None:
        launched.ready.synchronize()
    count, carried = launched.carried[0], launched.carried[1:]
    expected = sum(max(len(t) - 1, 0) for t in launched.fields)
    if int(count.item()) != expected:  # cannot happen for a collated row; guards the alignment
        raise RuntimeError(f"{expected} field tokens to score but {int(count.item())} field positions")
    table = launched.table.tolist()
    prompt, start = [], 0
    for tokens in launched.fields:
        prompt.append(PromptLogprobs(tokens, table, start, launched.k))
        start += max(len(tokens) - 1, 0)
    return PromptScores(prompt, launched.next_token, carried)


def score_prompts(bank: PromptBank, rows: Sequence[tuple[BankEntry, EncodedRow]], k: int) -> PromptScores:
    """`launch_scores` and `read_scores`: the rows' scores, read at once."""
    return read_scores(launch_scores(bank, rows, k))


def field_ids(row: EncodedRow) -> list[int]:
    """The prompt's own tokens in an encoded row (its template's field 0): what echo lists."""
    return [t for t, f in zip(row.input_ids, row.field_index) if f == 0]


__all__ = ["PromptLogprobs", "PromptScores", "LaunchedScores", "launch_scores", "read_scores", "score_prompts", "field_ids", "CHUNK_SCORES"]
