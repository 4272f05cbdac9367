"""Prompt scoring: the log-probability of each of a prompt's own tokens given the tokens
before it, under its task's prompt (OpenAI's ``echo`` with ``logprobs``: what lm-eval's
loglikelihood tasks read).

    table = prompt_logprobs(bank, [(entry, encoded), ...], k=1)
    table[b][0]   # None: the first of the prompt's tokens has nothing of the prompt before it
    table[b][j]   # TokenLogprob(token, log p(token | everything before it), k best)

"A prompt's own tokens" are its field's tokens in the encoded row (`field_index`): never
the virtual tokens, nor the template's own text around the field. Token j's score comes
from the model's output at the real token before it (the row's previous real position:
virtual slots are taken out of the output, `forward.SoftPromptOutput`), so the template's
text, the input prompt's virtual tokens and a deep prompt's prefix all condition it, as
in the row's own forward. Rows of many tasks share one forward (`forward_mixed`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..encode import EncodedRow
from .bank import BankEntry, PromptBank
from .mixed import collate_mixed, forward_mixed
from .sampling import TokenLogprob


def prompt_logprobs(bank: PromptBank, rows: Sequence[tuple[BankEntry, EncodedRow]], k: int
                    ) -> list[list[TokenLogprob | None]]:
    """Per row, one entry per token of its field (its task's template has one field):
    None for the first, then each token's `TokenLogprob` with the `k` most likely tokens
    at its position (k = 0: none).

    Returns:
        [B] lists of N_b entries, N_b the row's field tokens.
    """
    batch = collate_mixed(bank, [e for e, _ in rows], [r for _, r in rows])
    out = forward_mixed(bank, batch, logits="all")
    logits, fields = out.logits, out.field_index  # (B, T, V), (B, T): aligned on the real tokens
    table: list[list[TokenLogprob | None]] = []
    for b in range(len(rows)):
        positions = (fields[b] == 0).nonzero().flatten()  # the field's tokens, in order (contiguous)
        if positions.numel() == 0:
            table.append([])
            continue
        tokens = batch["input_ids"].new_tensor(field_ids(rows[b][1]))
        if len(tokens) != positions.numel():  # cannot happen for a collated row; guards the alignment
            raise RuntimeError(f"row {b}: {len(tokens)} field tokens but {positions.numel()} field positions")
        scores = torch.log_softmax(logits[b, positions[1:] - 1].float(), -1)  # (N-1, V): each from the token before
        picked = scores.gather(1, tokens[1:, None].to(scores.device)).flatten().tolist()
        top = scores.topk(min(k, scores.shape[-1]), -1) if k > 0 else None
        values = top.values.tolist() if top is not None else [[] for _ in picked]
        ids = top.indices.tolist() if top is not None else [[] for _ in picked]
        table.append([None] + [TokenLogprob(int(t), lp, list(zip(i, v)))
                               for t, lp, i, v in zip(tokens[1:].tolist(), picked, ids, values)])
    return table


def field_ids(row: EncodedRow) -> list[int]:
    """The prompt's own tokens in an encoded row (its template's field 0): what echo lists."""
    return [t for t, f in zip(row.input_ids, row.field_index) if f == 0]


__all__ = ["prompt_logprobs", "field_ids"]
