"""Log-probabilities of continuations at a template's answer slot: the one place where
label words (verbalizer) and candidate objects (LAMA) are scored.

A continuation is a list of token ids that fills the answer slot ([MASK]):

* masked LM: one token, read from ``answer_logits`` (one forward for the whole batch);
* causal LM: any number of tokens, scored by their summed log-probability given the row
  (teacher forcing). The first token is read from ``answer_logits`` (the next-token
  distribution at the end of the row); the others come from forwards over the row with
  the continuation's tokens appended as real tokens. Continuations that share tokens
  share those forwards: one forward over ``row + c[:-1]`` scores every continuation
  whose ``[:-1]`` is a prefix of ``c[:-1]``, so single-token continuations cost nothing
  beyond the batch's own forward and ``" New York"`` / ``" New Zealand"`` need one
  forward each, ``" New"`` none. The row's own prefix is recomputed in every extended
  forward (no KV-cache reuse): simple, and correct for every method, deep prompts
  included.

Encoder-decoders are not scored here (they have no answer slot; use the generation task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..architecture import ModelKind
from ..batch import PromptBatch
from ..errors import ConfigError, EncodingError, UnsupportedModelError
from ..template import Mask

DEFAULT_CHUNK_SIZE = 64  # extended rows per forward


# -- the answer slot ------------------------------------------------------------------
def require_answer_slot(model, who: str) -> None:
    """Check that `model` can score words at its template's [MASK]: an LM head (masked or
    causal) and a template with [MASK].

    Raises:
        UnsupportedModelError: an encoder-decoder or a model without an LM head.
        ConfigError: the template has no [MASK].
    """
    name = type(model.base).__name__
    if model.spec.kind is ModelKind.SEQ2SEQ:
        raise UnsupportedModelError(
            f"{who} reads label words at the [MASK] slot of a masked or causal LM; {name} is an "
            "encoder-decoder: use the generation task (the target text is the label word)"
        )
    if model.base.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{who} needs a model with an LM head to read words at [MASK]; {name} has none "
            "(load the model with its masked-LM or causal-LM head, or use a classification head)"
        )
    if not model.template.has_mask:
        raise ConfigError(
            f"{who} reads the answer at the template's [MASK], but template {model.template.source!r} "
            "has no [MASK]; add one where the answer goes, e.g. '{text} It was [MASK] .'"
        )
    if model.encoder is None:
        raise ConfigError(f"{who} needs the model's tokenizer: pass tokenizer=... to SoftPromptModel")


def answer_space(model) -> bool:
    """Whether the template puts a word boundary before [MASK] (then BPE words at the slot
    are tokenized in their after-a-space form, e.g. ``"Ġgreat"``)."""
    for item in model.template.items:
        if isinstance(item, Mask):
            return item.space_before
    return True


def answer_token_ids(model, text: str, *, data: bool = False) -> list[int]:
    """Token ids of `text` as it fills the answer slot (with the template's word boundary).

    Args:
        data: `text` comes from an example (special-token text is kept as plain text).
    """
    return model.encoder.tokenize(text, answer_space(model), data=data)


def describe_tokens(model, ids: Sequence[int]) -> str:
    """``['Ġgre', 'at']`` for error messages."""
    return str(model.tokenizer.convert_ids_to_tokens(list(ids)))


# -- scoring --------------------------------------------------------------------------
@dataclass
class _Plan:
    """How to score one list of continuations for one row.

    firsts: (C,) first token of each continuation (read from answer_logits).
    contexts: the maximal ``c[:-1]`` prefixes; one extended forward each.
    entries[m]: (offset i, token c[i], continuation index) for i >= 1, read at the
        position of context m's token i-1.
    """

    firsts: torch.Tensor
    contexts: list[tuple[int, ...]] = field(default_factory=list)
    entries: list[tuple[list[int], list[int], list[int]]] = field(default_factory=list)


def _plan(continuations: Sequence[Sequence[int]]) -> _Plan:
    seqs = [tuple(int(t) for t in c) for c in continuations]
    for j, s in enumerate(seqs):
        if not s:
            raise ConfigError(f"continuation {j} is empty: nothing to score")
    plan = _Plan(firsts=torch.tensor([s[0] for s in seqs], dtype=torch.long))
    needed = {s[:-1] for s in seqs if len(s) > 1}
    strict_prefixes = {c[:i] for c in needed for i in range(1, len(c))}
    maximal = sorted(c for c in needed if c not in strict_prefixes)
    owner: dict[tuple[int, ...], int] = {}
    for m, ctx in enumerate(maximal):
        for i in range(1, len(ctx) + 1):
            owner.setdefault(ctx[:i], m)
    plan.contexts = maximal
    plan.entries = [([], [], []) for _ in maximal]
    for j, s in enumerate(seqs):
        if len(s) > 1:
            offsets, tokens, which = plan.entries[owner[s[:-1]]]
            for i in range(1, len(s)):
                offsets.append(i)
                tokens.append(s[i])
                which.append(j)
    return plan


def _check_causal_rows(batch: PromptBatch) -> None:
    """Appending after a row continues the answer slot only if the slot ends the row."""
    mask = batch["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,) last attended column
    answer = batch["answer_index"]
    if (answer < 0).any() or (answer != last).any():
        raise EncodingError(
            "scoring several tokens at the answer slot needs rows that end at it (a causal LM's "
            "template is cut at [MASK]); build the batch with model.encode"
        )


def _answer_log_probs(model, batch: PromptBatch) -> torch.Tensor:
    """(B, V) log-softmax at each row's answer slot (the LM head runs there only)."""
    out = model(**batch, logits="answer")
    if out.answer_logits is None:
        raise ConfigError(f"no answer logits: template {model.template.source!r} needs [MASK] and the model an LM head")
    return out.answer_logits.float().log_softmax(-1)


def _score(model, batch: PromptBatch, plans: Sequence[_Plan], answer_log_probs: torch.Tensor | None,
           chunk_size: int) -> torch.Tensor:
    """Summed log-probabilities of every row's continuations, flattened row-major: (sum C_b,)."""
    B = batch["input_ids"].shape[0]
    if answer_log_probs is None:
        answer_log_probs = _answer_log_probs(model, batch)
    device = answer_log_probs.device
    sizes = [len(p.firsts) for p in plans]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    row_of = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(sizes, device=device))
    firsts = torch.cat([p.firsts for p in plans]).to(device)
    scores = answer_log_probs[row_of, firsts]  # (N,)
    pairs = [(b, m) for b, p in enumerate(plans) for m in range(len(p.contexts))]
    if not pairs:
        return scores
    if model.spec.kind is not ModelKind.CAUSAL:
        raise UnsupportedModelError(
            f"{type(model.base).__name__} is a masked LM: it scores one token at [MASK]; "
            "multi-token continuations need a causal LM"
        )
    _check_causal_rows(batch)
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        rows = torch.tensor([b for b, _ in chunk], device=device)
        contexts = [plans[b].contexts[m] for b, m in chunk]
        extended, _ = batch.append_tokens(rows, contexts, pad_id=model.encoder.pad_id, padding_side=model.padding_side)
        out = model(**extended)
        mask = out.attention_mask  # (n, T)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (n,) the last context token
        pair_idx, pos, tok, target = [], [], [], []
        for k, (b, m) in enumerate(chunk):
            offs, toks, which = plans[b].entries[m]
            L = len(contexts[k])
            end = int(last[k])
            pair_idx += [k] * len(offs)
            pos += [end - L + i for i in offs]  # the output at context token i-1 predicts token i
            tok += toks
            target += [offsets[b] + j for j in which]
        pair_idx = torch.tensor(pair_idx, device=device)
        pos = torch.tensor(pos, device=device)
        picked = out.logits[pair_idx, pos].float().log_softmax(-1)  # (K, V): only the positions read
        values = picked.gather(1, torch.tensor(tok, device=device).unsqueeze(1)).squeeze(1)  # (K,)
        scores = scores.index_add(0, torch.tensor(target, device=device), values)
    return scores


def sequence_log_probs(model, batch: PromptBatch, continuations: Sequence[Sequence[int]], *,
                       answer_log_probs: torch.Tensor | None = None,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log p(continuation | row) of every continuation for every row, at the answer slot.

    Args:
        model: a SoftPromptModel with an LM head and a template with [MASK].
        batch: (B, S) from `model.encode`.
        continuations: C lists of token ids, the same for every row (label words,
            candidate objects); multi-token ones need a causal LM.
        answer_log_probs: (B, V) log-softmax of the batch's ``answer_logits``, if already
            computed (saves a forward).
        chunk_size: extended rows per forward (memory vs. speed).

    Returns:
        (B, C) summed token log-probabilities (differentiable).
    """
    B = batch["input_ids"].shape[0]
    plan = _plan(continuations)
    if not plan.contexts:  # one token each (label words, mostly): a gather at the answer slot
        if answer_log_probs is None:
            answer_log_probs = _answer_log_probs(model, batch)
        return answer_log_probs[:, plan.firsts.to(answer_log_probs.device, non_blocking=True)]
    return _score(model, batch, [plan] * B, answer_log_probs, chunk_size).view(B, len(continuations))


def row_log_probs(model, batch: PromptBatch, continuations: Sequence[Sequence[int]], *,
                  answer_log_probs: torch.Tensor | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log p(continuations[b] | row b) for each row b: one continuation per row (a gold
    answer). Same scoring as `sequence_log_probs`.

    Returns:
        (B,) summed token log-probabilities (differentiable).
    """
    B = batch["input_ids"].shape[0]
    if len(continuations) != B:
        raise ValueError(f"{len(continuations)} continuations for {B} rows")
    return _score(model, batch, [_plan([c]) for c in continuations], answer_log_probs, chunk_size)
