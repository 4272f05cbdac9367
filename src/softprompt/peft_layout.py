"""Token ids from a tokenizer, laid out as HF PEFT lays them out: P virtual slots in front of
the text. For templates of that layout only (`peft_layout`), `SoftPromptModel` takes
``model(input_ids=..., attention_mask=...)`` as PEFT users call it, and gives what
``model(**model.encode(texts))`` gives; every other template needs `encode` (where the
anchors, answer slot and fields go is not in the ids). Here too: the checks of such ids
(`batch_from_ids`) and the refusals of what a tokenizer's output cannot carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .architecture import ModelSpec
from .batch import PromptBatch
from .errors import EncodingError
from .template import Anchor, Placeholder, Start, Template, Virtual


@dataclass(frozen=True)
class PeftLayout:
    """A template that lays a row out as HF PEFT does: virtual tokens, then one field's text as
    the tokenizer gives it (``[P:n] {text}``, ``[P:n] [START] {text}``; ``{text}`` for a deep
    prompt). For these alone, token ids from the tokenizer say where the virtual slots go.

    Attributes:
        num_virtual_tokens: P virtual slots in front of the text (0: a deep prompt's ``{text}``).
        after_lead: the slots follow the tokenizer's leading special tokens ([CLS], <s>, BOS),
            as in ``[P:n] {text}``; else they come first (``[START]``: PEFT's own layout).
    """

    num_virtual_tokens: int
    after_lead: bool


def peft_layout(template: Template) -> PeftLayout | None:
    """The template's `PeftLayout`, or None when its rows hold more than virtual tokens then
    the text (anchor words, an answer slot, virtual tokens inside or after the text, a second
    field): token ids alone cannot say where those go."""
    items = list(template.items)
    virtual = 0
    while items and isinstance(items[0], Virtual):  # rows 0 .. P-1 of the table, in order
        virtual += items.pop(0).count
    start = bool(items) and isinstance(items[0], Start)
    rest = items[1:] if start else items
    if len(rest) != 1 or not isinstance(rest[0], Placeholder):
        return None
    return PeftLayout(num_virtual_tokens=virtual, after_lead=not start)


def beyond_peft_layout(template: Template) -> str:
    """What a template without a `PeftLayout` has beyond it, in words (for refusals)."""
    items = template.items
    if template.has_mask:
        return "an answer slot [MASK]"
    if any(isinstance(i, Anchor) for i in items):
        return "anchor text around the field"
    if sum(isinstance(i, Placeholder) for i in items) > 1:
        return "more than one field"
    return "virtual tokens inside or after the text"


def insert_virtual_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: PeftLayout, *,
                         lead: Sequence[int] | None, pad_id: int) -> PromptBatch:
    """Tokenized texts (a tokenizer's output, padded on either side) laid out as `encode` lays
    out the same texts through `layout`'s template: P virtual slots put in front of each row's
    text, after its leading special tokens with ``layout.after_lead``, attended (PEFT's
    prepending; its ``-100`` labels for the slots are implied: labels are aligned to the real
    tokens, see `SoftPromptModel.forward`).

    Args:
        input_ids: (B, S) token ids, the leading special tokens included.
        attention_mask: (B, S) 1 at tokens, 0 at pads: one run of tokens per row.
        layout: where the slots go (`peft_layout`).
        lead: the tokenizer's leading special tokens, checked at the start of every row when
            the slots follow them (None: unknown, no tokenizer).
        pad_id: the id the slots hold (never embedded: the prompt's rows replace it).

    Returns:
        A `PromptBatch` of (B, S + P) tensors whose real tokens are the S columns of
        `input_ids` in order: outputs aligned to the real tokens line up with `input_ids`.

    Raises:
        EncodingError: a row with no token, or with pads between its tokens; rows that do not
            begin with the leading special tokens the slots follow (or no tokenizer to say).
    """
    B, S = input_ids.shape
    P = layout.num_virtual_tokens
    attention_mask = attention_mask.to(input_ids.device).long()
    none = torch.full_like(input_ids, -1)
    if P == 0:
        return PromptBatch(input_ids=input_ids, attention_mask=attention_mask, prompt_index=none)
    skip = 0
    if layout.after_lead:
        if lead is None:
            raise EncodingError("the template puts the virtual tokens after the tokenizer's leading special tokens: "
                                "without the tokenizer their place in token ids is unknown; pass tokenizer=... to "
                                "SoftPromptModel, or use the template '[P:n] [START] {text}' (PEFT's layout)")
        skip = len(lead)
    device = input_ids.device
    columns = torch.arange(S, device=device)
    tokens = attention_mask.bool()  # (B, S)
    count = tokens.sum(1)  # (B,)
    first = torch.where(tokens, columns, S).amin(1)  # (B,) each row's first token (S: none)
    last = torch.where(tokens, columns, -1).amax(1)
    at = first + skip  # (B,) the column the slots go before
    checks = [count.gt(0), last - first + 1 == count]
    if skip:
        offsets = torch.arange(skip, device=device)
        where = (first[:, None] + offsets).clamp(max=S - 1)  # (B, skip)
        expected = torch.as_tensor(list(lead), dtype=input_ids.dtype, device=device)
        checks.append(count.ge(skip) & input_ids.gather(1, where).eq(expected).all(1))
    ok = torch.stack(checks).all(1).tolist()  # one read of the device for every check
    if not ok[0]:
        rows = count.eq(0).nonzero().flatten().tolist()
        raise EncodingError(f"row(s) {rows} of input_ids have no tokens (attention_mask all 0)")
    if not ok[1]:
        raise EncodingError("attention_mask must mark one run of tokens per row (padding on the left or the right)")
    if skip and not ok[2]:
        raise EncodingError(f"the template puts the virtual tokens after the tokenizer's leading special tokens {list(lead)}, "
                            "but rows of input_ids do not begin with them: tokenize with add_special_tokens=True, "
                            "or use the template '[P:n] [START] {text}' (PEFT's layout)")
    dest = columns + (columns >= at[:, None]).long() * P  # (B, S) each column's new place
    slots = at[:, None] + torch.arange(P, device=device)  # (B, P) the virtual slots' columns
    ids = torch.full((B, S + P), pad_id, dtype=input_ids.dtype, device=device).scatter_(1, dest, input_ids)
    mask = torch.zeros((B, S + P), dtype=torch.long, device=device).scatter_(1, dest, attention_mask)
    mask.scatter_(1, slots, 1)
    prompt_index = torch.full((B, S + P), -1, dtype=torch.long, device=device)
    prompt_index.scatter_(1, slots, torch.arange(P, device=device).expand(B, P))
    return PromptBatch(input_ids=ids, attention_mask=mask, prompt_index=prompt_index)


def batch_from_ids(template: Template, spec: ModelSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   *, prefix_length: int, lead: Sequence[int] | None, pad_id: int) -> PromptBatch:
    """`SoftPromptModel.batch_from_ids`: a tokenizer's ids through `template`, after the
    checks that token ids alone allow (the template has a `PeftLayout`; the row with its
    slots fits the base's positions; no left padding for a base that takes no position ids).

    Args:
        input_ids: (B, S) token ids; attention_mask: (B, S) or None (all tokens).
        prefix_length: positions a deep prompt takes in front of every row (0: an input prompt).
        lead, pad_id: as for `insert_virtual_slots`.

    Returns:
        A `PromptBatch` of (B, S + P) tensors (`insert_virtual_slots`).
    """
    layout = peft_layout(template)
    if layout is None:
        fields = ", ".join(f"{name!r}: ..." for name in template.fields)
        raise EncodingError(
            f"input_ids without prompt_index: token ids alone say where the virtual tokens go only for a template "
            f"of virtual tokens then the text ('[P:n] {{text}}', '[P:n] [START] {{text}}'; '{{text}}' for a deep "
            f"prompt: PEFT's layout), and template {template.source!r} has {beyond_peft_layout(template)}; "
            f"build the batch with model.encode([{{{fields}}}, ...]) and call model(**batch)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    limit = spec.max_positions
    taken = layout.num_virtual_tokens + prefix_length
    if limit is not None and input_ids.shape[1] + taken > limit:
        raise EncodingError(f"input_ids are {input_ids.shape[1]} tokens wide and the prompt takes {taken} positions: "
                            f"over the {limit} positions of {spec.model_type}; tokenize with truncation=True, "
                            f"max_length={limit - taken}")
    if not spec.accepts_position_ids and bool((attention_mask[:, 0].eq(0) & attention_mask.bool().any(1)).any()):
        raise EncodingError(f"{spec.model_type} takes no position ids, so left padding would shift its "
                            "positions; pad on the right (tokenizer.padding_side = 'right')")
    return insert_virtual_slots(input_ids, attention_mask, layout, lead=lead, pad_id=pad_id)


def refuse_encode_fields(**given: torch.Tensor | None) -> None:
    """The columns `encode` adds beside prompt_index index its rows, not a tokenizer's."""
    named = [name for name, value in given.items() if value is not None]
    if named:
        raise EncodingError(f"{', '.join(named)} without prompt_index: they index the rows of a batch from encode(); "
                            "pass that batch whole (model(**batch))")


def refuse_segments(token_type_ids: torch.Tensor | None) -> None:
    """Segment ids beside a tokenizer's ids: all 0 is what the base reads by default (and what
    every template's row is); others would be dropped, so they are refused."""
    if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
        raise EncodingError("token_type_ids other than 0 (a text pair): a template's row is one segment; "
                            "put the pair's fields in a template ('{premise} [SEP] {hypothesis}') and use model.encode")


__all__ = ["PeftLayout", "batch_from_ids", "beyond_peft_layout", "insert_virtual_slots", "peft_layout",
           "refuse_encode_fields", "refuse_segments"]
