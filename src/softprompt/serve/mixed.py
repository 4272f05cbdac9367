"""Mixed-task batches: every row of one batch with its own task's prompt and template.

    batch = encode_mixed(bank, ["sentiment", "ner", "sentiment"], [ex0, ex1, ex2])
    out = forward_mixed(bank, batch)               # row b == row b alone with its task
    new = generate_mixed(bank, batch, max_new_tokens=16)

Rows are encoded by their task's template encoder and padded together; input prompts are
gathered into each row's virtual slots and deep prompts go in as a per-row key/value
prefix with a per-row mask (`PromptBank.prompts_for`), through the same `forward.run` /
`forward.generate` a single `SoftPromptModel` uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import forward
from ..batch import PromptBatch
from ..encode import EncodedRow
from ..errors import ConfigError, EncodingError
from .bank import PromptBank
from .entry import BankEntry
from .prompt_cache import strip_lead


@dataclass(eq=False)
class MixedBatch(PromptBatch):
    """A `PromptBatch` whose rows belong to different tasks: ``batch.tasks[b]`` names row b's,
    ``batch.entries[b]`` is its bank entry as the batch was built (the forward uses that
    one even if the task is removed or replaced meanwhile: `PromptBank.entry`; None: look
    the names up)."""

    tasks: list[str] = field(default_factory=list)
    entries: list[BankEntry] | None = None
    # every row's answer slot, where it has one, is its last column (known on the host when
    # the batch was collated; None: not known, read `answer_index`)
    answers_last: bool | None = None

    def rows(self, rows: Sequence[int]) -> "MixedBatch":
        sub = super().rows(rows)
        return dataclasses.replace(sub, tasks=[self.tasks[r] for r in rows],
                                   entries=None if self.entries is None else [self.entries[r] for r in rows])

    def answers_at_last_column(self) -> bool:
        """Whether every row's answer slot (-1: none) is the last column (the host's
        record where the batch has one, else one read of the device)."""
        if self.answers_last is not None:
            return self.answers_last
        answers = self.answer_index
        return answers is not None and bool(((answers == self.input_ids.shape[1] - 1) | (answers < 0)).all())


def encode_mixed(bank: PromptBank, tasks: Sequence[str | BankEntry], examples: Sequence[Mapping[str, Any]], *,
                 padding_side: str | None = None, max_length: int | None = None, truncate: bool = True) -> MixedBatch:
    """Encode row b with task ``tasks[b]``'s template and pad the rows together.

    Args:
        padding_side: default: the base model's (left for causal LMs, right otherwise).
        max_length: most tokens per row, virtual and deep-prompt positions included
            (default: the model's limit); longer inputs are cut inside their placeholders,
            or refused with `InputTooLongError` when `truncate` is False.

    Raises:
        UnknownTaskError: a task the bank does not hold (the message lists the loaded ones).
        EncodingError: an example that does not fit its template (missing field, ...).
    """
    if len(tasks) != len(examples):
        raise ConfigError(f"{len(tasks)} task names for {len(examples)} examples")
    if not tasks:
        raise EncodingError("nothing to encode: the batch is empty")
    entries = bank.entries(tasks)
    rows = [e.model.encoder.encode(ex, max_length=max_length, index=i, truncate=truncate)
            for i, (e, ex) in enumerate(zip(entries, examples))]
    return collate_mixed(bank, entries, rows, padding_side=padding_side)  # the entries encoded with, not the names


def collate_mixed(bank: PromptBank, tasks: Sequence[str | BankEntry], rows: Sequence[EncodedRow], *,
                  padding_side: str | None = None) -> MixedBatch:
    """Pad rows already encoded by their tasks' encoders into one batch (the engine encodes
    each request once, when it checks it, and passes the entries it checked them with)."""
    # a row that cannot start after its task's cached lead (an empty field) runs whole
    entries = [e.for_row(r) for e, r in zip(bank.entries(tasks), rows)]
    first = entries[0].model
    side = padding_side or first.padding_side
    # a task with a cached leading segment starts its rows after it (its keys and values are the prefix)
    rows = [strip_lead(r, e.lead.length) if e.lead is not None else r for r, e in zip(rows, entries)]
    batch = first.encoder.collate(rows, side)  # one tokenizer: one pad id for every task
    answers = batch.get("answer_index")  # still on the host: read here, not from the device later
    last = None if answers is None else bool(((answers == batch["input_ids"].shape[1] - 1) | (answers < 0)).all())
    return MixedBatch(**batch, tasks=[e.name for e in entries], entries=entries, answers_last=last).to(first.device)


def output_rows(out: forward.SoftPromptOutput, rows: Sequence[int]) -> forward.SoftPromptOutput:
    """The rows `rows` of a forward's output."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    picked = {k: (v.index_select(0, index.to(v.device)) if torch.is_tensor(v) and v.dim() > 0 else v)
              for k, v in out.items()}
    return forward.SoftPromptOutput(**picked)


def _check(bank: PromptBank, batch: MixedBatch) -> None:
    if len(getattr(batch, "tasks", ())) != batch["input_ids"].shape[0]:  # e.g. a plain PromptBatch
        raise ConfigError("a mixed batch names the task of every row: build it with encode_mixed")


def _entries(bank: PromptBank, batch: MixedBatch) -> list[BankEntry]:
    """The entries the batch was built with (by name for a batch built by hand)."""
    return list(batch.entries) if batch.entries is not None else bank.entries(batch.tasks)


def forward_mixed(bank: PromptBank, batch: MixedBatch, *, output_hidden_states: bool = False,
                  logits: str = "all", decoder_input_ids: torch.Tensor | None = None,
                  base_forward: Callable[[Any, dict[str, Any]], Any] | None = None) -> forward.SoftPromptOutput:
    """One forward of the base model, row b with the prompt of ``batch.tasks[b]``.

    Args:
        decoder_input_ids: (B, T_dec) for an encoder-decoder.
        base_forward: runs the base model, ``base_forward(base, inputs)`` (the engine's
            compiled `head_forward`); default ``base(**inputs)``.

    Returns:
        `SoftPromptOutput` over the real tokens (T = S - the fewest virtual slots of a row;
        rows with more virtual slots are padded at the end, see ``attention_mask``).
    """
    _check(bank, batch)
    entries = _entries(bank, batch)
    model = entries[0].model
    prompts = bank.prompts_for(entries)
    with torch.no_grad():
        return forward.run(bank.base, model.spec, batch["input_ids"], batch["attention_mask"], batch["prompt_index"],
                           prompts, answer_index=batch.get("answer_index"), field_index=batch.get("field_index"),
                           word_index=batch.get("word_index"), output_hidden_states=output_hidden_states,
                           logits=logits, lm_head_columns=model.keeps_logits, decoder_input_ids=decoder_input_ids,
                           base_forward=base_forward)


def head_forward(base, inputs: dict[str, Any]):
    """The base model's forward over a batch of head requests (`forward_mixed`): its own
    code object, so its compiled versions are counted apart from every other compile."""
    return base(**inputs)


def generate_mixed(bank: PromptBank, batch: MixedBatch, **generate_kwargs) -> torch.Tensor:
    """transformers' `generate()` for a mixed batch (greedy or sampling, its KV cache).

    Returns:
        (B, N) the new tokens only (pads after a row's end-of-sequence).
    """
    _check(bank, batch)
    entries = _entries(bank, batch)
    model = entries[0].model
    prompts = bank.prompts_for(entries)
    with torch.no_grad():
        return forward.generate(bank.base, model.spec, batch["input_ids"], batch["attention_mask"],
                                batch["prompt_index"], prompts, model.encoder.pad_id, **generate_kwargs)


__all__ = ["MixedBatch", "encode_mixed", "collate_mixed", "forward_mixed", "generate_mixed", "head_forward", "output_rows"]
