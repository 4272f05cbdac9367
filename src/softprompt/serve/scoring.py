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
(`forward.lm_head`), so memory stays at one chunk's scores whatever the rows' lengths and
the vocabulary. The same forward gives each row's next-token scores (its last column, as a
prefill does): a request of one new token (lm-eval sends ``max_tokens: 1``) is answered
from them without a prefill of its own (`Decoder.answer_first`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..encode import EncodedRow
from ..forward import lm_head
from .bank import BankEntry, PromptBank
from .mixed import collate_mixed, forward_mixed
from .sampling import TokenLogprob

#: most fp32 scores (positions x vocabulary) one chunk of the LM head holds: 1 GiB
CHUNK_SCORES = 2**28


@dataclass
class PromptScores:
    """What one scoring forward gives its B rows.

    Attributes:
        prompt: per row, one entry per token of its field: None for the first, then each
            token's `TokenLogprob` with the k most likely tokens at its position.
        next_token: (B, V) each row's scores for the token after it (its last column).
    """

    prompt: list[list[TokenLogprob | None]]
    next_token: torch.Tensor


def score_prompts(bank: PromptBank, rows: Sequence[tuple[BankEntry, EncodedRow]], k: int) -> PromptScores:
    """Score the field tokens of every row (its task's template has one field) in one
    forward of the rows together, with `k` top log-probabilities at each position (0: none)."""
    batch = collate_mixed(bank, [e for e, _ in rows], [r for _, r in rows])
    out = forward_mixed(bank, batch, logits="last", output_hidden_states=True)
    hidden, field = out.last_hidden_state, out.field_index == 0  # (B, T, D), (B, T): aligned on the real tokens
    # token t + 1 of a field is scored from the output at t (the field is contiguous in the
    # real tokens): every field token but a row's first, in row-major order
    rows_at, before = (field[:, 1:] & field[:, :-1]).nonzero(as_tuple=True)
    fields = [field_ids(row) for _, row in rows]
    flat = [t for tokens in fields for t in tokens[1:]]
    if len(flat) != rows_at.numel():  # cannot happen for a collated row; guards the alignment
        raise RuntimeError(f"{len(flat)} field tokens to score but {rows_at.numel()} field positions")
    states = hidden[rows_at, before]  # (N, D)
    chosen = torch.tensor(flat, dtype=torch.long, device=states.device)
    chunk = max(1, CHUNK_SCORES // bank.vocabulary_size)
    table = torch.cat([_chunk_logprobs(lm_head(bank.base, states[i: i + chunk]), chosen[i: i + chunk], k)
                       for i in range(0, len(flat), chunk)]).tolist() if flat else []  # (N, 1 + 2k): one copy
    prompt: list[list[TokenLogprob | None]] = []
    start = 0
    for tokens in fields:
        scored = table[start: start + max(len(tokens) - 1, 0)]
        start += len(scored)
        prompt.append([None] * bool(tokens) + [TokenLogprob(t, v[0], [(int(v[1 + k + j]), v[1 + j]) for j in range(k)])
                                               for t, v in zip(tokens[1:], scored)])
    return PromptScores(prompt, out.logits[:, -1])


def _chunk_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """(n, V) scores, (n,) tokens -> (n, 1 + 2k) float32 as `sampling.logprobs_of`: each
    token's log-probability, the k best and their ids. The log-softmax is not written out
    (a score minus the row's fp32 log-sum-exp, read where needed): over a 128k vocabulary
    that tensor is what this step's time goes to."""
    lse = torch.logsumexp(logits.float(), -1, keepdim=True)  # (n, 1)
    picked = logits.gather(1, chosen.view(-1, 1)).float() - lse
    top = logits.topk(min(k, logits.shape[-1]), -1)  # the order of the scores is the log-probabilities'
    return torch.cat([picked, top.values.float() - lse, top.indices.float()], 1)


def field_ids(row: EncodedRow) -> list[int]:
    """The prompt's own tokens in an encoded row (its template's field 0): what echo lists."""
    return [t for t, f in zip(row.input_ids, row.field_index) if f == 0]


__all__ = ["PromptScores", "score_prompts", "field_ids", "CHUNK_SCORES"]
