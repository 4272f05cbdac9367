"""The typed batch every forward takes, and every layout operation on its (B, S) tensors.

`encode.TemplateEncoder.collate` pads encoded rows into a `PromptBatch`; what is done to a
batch after that lives here: picking rows (one task's), packing them without padding,
appending tokens after each row's last one (a generation target to learn from, a
continuation to score), and aligning per-column values to the real tokens (the layout of
`SoftPromptOutput`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping, Sequence

import torch

from . import inject
from .packing import pack_index
from .transfer import to_device


@dataclass(eq=False)
class PromptBatch(Mapping[str, torch.Tensor]):
    """The tensors `SoftPromptModel.forward` / `generate` take. A read-only mapping of its
    tensors that are set, so ``model(**batch)`` and ``batch["input_ids"]`` work.

    Attributes:
        input_ids: (B, S) token ids; a placeholder id at virtual slots and pads.
        attention_mask: (B, S) 1 at real tokens and virtual slots, 0 at pads.
        prompt_index: (B, S) row of the prompt table at a virtual slot, else -1.
        answer_index: (B,) the position whose output answers [MASK], or -1.
        field_index: (B, S) the template field of each token, else -1.
        word_index: (B, S) the word of a pre-split field each token belongs to, else -1.
        num_words: words of each row's pre-split field (token classification's
            predictions need them; not a model input, so not a key).
        pack_index: (N, W) the rows packed into N sequences without padding
            (`packing.pack_index`; `packed`), or None: the forward runs the (B, S) rows.
        lengths: each row's tokens, on the host, where the batch was collated from rows
            (packing reads them without waiting for the device); not a key.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_index: torch.Tensor
    answer_index: torch.Tensor | None = None
    field_index: torch.Tensor | None = None
    word_index: torch.Tensor | None = None
    num_words: list[int] | None = None
    pack_index: torch.Tensor | None = None
    lengths: list[int] | None = None

    #: the model inputs, in the order `keys()` gives them
    TENSORS: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "prompt_index", "answer_index",
                                          "field_index", "word_index", "pack_index")

    def keys(self) -> list[str]:  # type: ignore[override]
        return [k for k in self.TENSORS if getattr(self, k) is not None]

    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self, key) if key in self.TENSORS else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to(self, device) -> "PromptBatch":
        """The batch on `device` (what is not a tensor, e.g. `num_words`, comes along)."""
        return dataclasses.replace(self, **{k: to_device(v, device) for k, v in self.items()})

    def rows(self, rows: Sequence[int]) -> "PromptBatch":
        """The sub-batch of `rows` (same columns; `num_words` follows), e.g. one task's rows;
        unpacked (a packing is of the whole batch)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        picked = {k: v.index_select(0, index) for k, v in self.items() if k != "pack_index"}
        words = None if self.num_words is None else [self.num_words[r] for r in rows]
        lengths = None if self.lengths is None else [self.lengths[r] for r in rows]
        return dataclasses.replace(self, **picked, num_words=words, pack_index=None, lengths=lengths)

    def packed(self, budget: int) -> "PromptBatch":
        """This batch with its rows packed into sequences of at most `budget` tokens
        (`packing.pack_index`): a forward over it computes what the padded rows give."""
        lengths = self.lengths if self.lengths is not None else self.attention_mask.sum(1).tolist()
        return dataclasses.replace(self, pack_index=pack_index(self.attention_mask, lengths, budget))

    def append_tokens(self, rows: torch.Tensor, tokens: Sequence[Sequence[int]], *, pad_id: int, padding_side: str
                      ) -> tuple["PromptBatch", torch.Tensor]:
        """Rows of this batch with `tokens` appended after their last token, as real tokens.

        Works for left- and right-padded batches; the result is padded on `padding_side` (the
        model's) with `pad_id` and trimmed to its longest row. Virtual slots stay where they
        were (before the appended tokens), so a causal LM reads the appended tokens after
        the whole row, prompt included.

        Args:
            rows: (N,) which row of this batch each new row copies (repeats allowed).
            tokens: N lists of token ids to append (may be empty).

        Returns:
            (new_batch, positions): `new_batch` of (N, S') tensors; `positions` (N, L) the
            column of each appended token in `new_batch`, -1 where a row has fewer than L.
        """
        batch = self  # (B, S); a name for the columns read below
        device = batch["input_ids"].device
        rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        N, L = len(tokens), max((len(t) for t in tokens), default=0)
        extra = torch.full((N, L), pad_id, dtype=torch.long)
        valid_extra = torch.zeros((N, L), dtype=torch.bool)
        for i, t in enumerate(tokens):
            if len(t):
                extra[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
                valid_extra[i, : len(t)] = True
        extra, valid_extra = extra.to(device), valid_extra.to(device)
        minus = torch.full((N, L), -1, dtype=torch.long, device=device)
        S = batch["input_ids"].shape[1]
        valid = torch.cat([batch["attention_mask"][rows].bool(), valid_extra], 1)  # (N, S + L)
        none = torch.full_like(batch["input_ids"], -1)
        columns = {
            "input_ids": torch.cat([batch["input_ids"][rows], extra], 1),
            "prompt_index": torch.cat([batch["prompt_index"][rows], minus], 1),
            "field_index": torch.cat([batch.get("field_index", none)[rows], minus], 1),
            "word_index": torch.cat([batch.get("word_index", none)[rows], minus], 1),
        }
        left = padding_side == "left"
        # A stable sort on "is a pad" moves every pad to one side and keeps the tokens in order.
        key = (~valid).long() if not left else valid.long()
        order = torch.sort(key, dim=1, stable=True).indices  # (N, S + L) new column -> old column
        inverse = torch.argsort(order, dim=1)  # old column -> new column
        new_valid = valid.gather(1, order)
        out = {}
        fills = {"input_ids": pad_id, "prompt_index": -1, "field_index": -1, "word_index": -1}
        for k, v in columns.items():
            out[k] = v.gather(1, order).masked_fill(~new_valid, fills[k])
        out["attention_mask"] = new_valid.long()
        answer = batch["answer_index"][rows] if "answer_index" in batch else torch.full((N,), -1, device=device)
        moved = inverse.gather(1, answer.clamp(min=0).unsqueeze(1)).squeeze(1)
        out["answer_index"] = torch.where(answer >= 0, moved, answer)
        positions = torch.where(valid_extra, inverse[:, S:], minus)
        # Drop the columns that are padding in every row.
        width = int(new_valid.sum(1).max()) if N else 0
        drop = new_valid.shape[1] - width
        if drop:
            if left:
                out = {k: (v[:, drop:] if v.dim() == 2 else v) for k, v in out.items()}
                kept = out["answer_index"]
                out["answer_index"] = torch.where(kept >= 0, kept - drop, kept)
                positions = torch.where(positions >= 0, positions - drop, positions)
            else:
                out = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in out.items()}
        return PromptBatch(**out), positions

    def align_to_real_tokens(self, full: torch.Tensor) -> torch.Tensor:
        """(B, S) values per column of the batch -> (B, T) aligned to the real tokens, the layout
        of `SoftPromptOutput` and of the ``labels`` that `SoftPromptModel.forward` takes."""
        return inject.gather_tokens(full, inject.real_token_index(self.prompt_index))
