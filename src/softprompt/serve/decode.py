"""Continuous batching for causal LMs: one decode loop over rows of many tasks.

Rows join the running batch when there is room (their prompt is prefilled in one forward
and their keys and values merged into the shared cache) and leave it as soon as they end
(end of sequence, a stop string, their token budget, a client gone): the batch never
carries finished rows, and waiting rows do not wait for the whole batch to end. Each row
keeps its own sampling settings (greedy, or temperature / top-k / top-p).

The shared cache is a transformers `DynamicCache`; rows of different lengths are aligned
on the right (the newest column is every row's current token), shorter ones padded on
the left with masked zeros; each row carries its own position.

Greedy rows give exactly what transformers' `generate()` gives each row alone (tested).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache

from .. import inject
from ..encode import EncodedRow
from ..forward import embed
from .bank import PromptBank
from .mixed import collate_mixed, encode_mixed


@dataclass
class Sampling:
    """One row's decoding settings (transformers' names)."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], eos: int | None) -> "Sampling":
        s = cls(eos_token_id=options.get("eos_token_id", eos))
        s.max_new_tokens = int(options.get("max_new_tokens", s.max_new_tokens))
        temperature = options.get("temperature")
        s.do_sample = bool(options.get("do_sample", temperature is not None and float(temperature) > 0))
        s.temperature = float(temperature) if temperature else 1.0
        s.top_k = int(options.get("top_k") or 0)
        s.top_p = float(options.get("top_p") or 1.0)
        return s


@dataclass
class DecodeRow:
    """A row to generate: its task, example, settings, and a sink for its tokens.

    Attributes:
        on_token: called with each new token id; returns True when the row is done (a stop
            string, a client gone) even before its end-of-sequence token or budget.
        on_done: called once with the row when it has finished.
    """

    task: str
    example: dict[str, Any]
    sampling: Sampling
    on_token: Callable[[int], bool] = lambda token: False
    on_done: Callable[["DecodeRow"], None] | None = None
    tokens: list[int] = field(default_factory=list)
    result: Any = None
    encoded: EncodedRow | None = None  # the row already encoded by its task (else encoded here)  # what on_done made of the row (the engine's Result)


def _pick(logits: torch.Tensor, rows: Sequence[DecodeRow], generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: arg-max for greedy rows, a sample for the others."""
    greedy = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.sampling.do_sample]
    if not sampled:
        return greedy
    index = torch.tensor(sampled, device=logits.device)
    x = logits.index_select(0, index).float()
    temperature = torch.tensor([rows[i].sampling.temperature for i in sampled], device=x.device)
    x = x / temperature[:, None]
    for j, i in enumerate(sampled):  # top-k and top-p: per row, rows differ
        k, p = rows[i].sampling.top_k, rows[i].sampling.top_p
        if k and k < x.shape[-1]:
            kth = x[j].topk(k).values[-1]
            x[j] = x[j].masked_fill(x[j] < kth, float("-inf"))
        if p < 1.0:
            sorted_x, order = x[j].sort(descending=True)
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs > p  # keep the smallest set whose mass reaches p
            x[j] = x[j].scatter(0, order[drop], float("-inf"))
    chosen = torch.multinomial(x.softmax(-1), 1, generator=generator).squeeze(-1)
    return greedy.index_copy(0, index, chosen)


class Decoder:
    """Runs `DecodeRow`s of a bank's tasks with continuous batching.

    Args:
        bank: the tasks (a causal LM base).
        max_rows: most rows decoding at once.
        admit: called between steps for more rows when there is room (the server's queue);
            returns a list of rows (possibly empty).
    """

    def __init__(self, bank: PromptBank, *, max_rows: int = 64, admit: Callable[[int], list[DecodeRow]] | None = None,
                 generator: torch.Generator | None = None):
        self.bank = bank
        self.base = bank.base
        self.max_rows = max_rows
        self.admit = admit
        self.generator = generator
        self.steps = 0  # forward calls of the last run (prefills included), for tests and metrics

    @torch.no_grad()
    def run(self, rows: Sequence[DecodeRow]) -> list[DecodeRow]:
        """Decode every row (and any the `admit` hook adds); each row's `tokens` holds its
        new tokens (without the end-of-sequence token) when it returns."""
        waiting = deque(rows)
        active: list[DecodeRow] = []
        cache = mask = positions = current = None
        self.steps = 0
        done_rows: list[DecodeRow] = []
        while waiting or active or self.admit is not None:
            room = self.max_rows - len(active)
            if room > 0 and self.admit is not None:
                waiting.extend(self.admit(room - len(waiting)) if room > len(waiting) else [])
            if not waiting and not active:
                break
            if waiting and room > 0:
                joining = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                first, j_cache, j_mask, j_pos = self._prefill(joining)
                cache, mask, positions = _merge(self.base, cache, mask, positions, j_cache, j_mask, j_pos)
                active += joining
                current = first if current is None else torch.cat([current, first])
                finished = [self._emit(r, int(t)) for r, t in zip(joining, first.tolist())]
                keep = [True] * (len(active) - len(joining)) + [not f for f in finished]
                cache, mask, positions, current, active = self._drop(keep, cache, mask, positions, current, active,
                                                                     done_rows)
                continue  # admit more before the next step if the joiners ended at once
            if not active:
                continue
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = self.base(input_ids=current[:, None], attention_mask=mask, position_ids=positions[:, None],
                            past_key_values=cache, use_cache=True, return_dict=True)
            self.steps += 1
            cache, positions = out.past_key_values, positions + 1
            current = _pick(out.logits[:, -1], active, self.generator)
            finished = [self._emit(r, int(t)) for r, t in zip(active, current.tolist())]
            cache, mask, positions, current, active = self._drop([not f for f in finished], cache, mask, positions,
                                                                 current, active, done_rows)
        return list(rows)

    def _emit(self, row: DecodeRow, token: int) -> bool:
        """Hand a row its new token; True when the row is done."""
        s = row.sampling
        if s.eos_token_id is not None and token == s.eos_token_id:
            return True
        row.tokens.append(token)
        return bool(row.on_token(token)) or len(row.tokens) >= s.max_new_tokens

    @staticmethod
    def _drop(keep, cache, mask, positions, current, active, done_rows):
        if all(keep):
            return cache, mask, positions, current, active
        for r, k in zip(active, keep):
            if not k:
                done_rows.append(r)
                if r.on_done is not None:
                    r.on_done(r)
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=mask.device)
        active = [r for r, k in zip(active, keep) if k]
        if not active:
            return None, None, None, None, []
        cache.batch_select_indices(index)
        return cache, mask.index_select(0, index), positions.index_select(0, index), current.index_select(0, index), \
            active

    def _prefill(self, rows: list[DecodeRow]):
        """One forward over the joining rows with their prompts: their first tokens, cache,
        attention mask over the cache (prefix + row) and next positions."""
        spec = self.bank[rows[0].task].model.spec
        names = [r.task for r in rows]
        if all(r.encoded is not None for r in rows):
            batch = collate_mixed(self.bank, names, [r.encoded for r in rows], padding_side="left")
        else:
            batch = encode_mixed(self.bank, names, [r.example for r in rows], padding_side="left")
        prompts = self.bank.prompts_for(batch.tasks)
        embeds = embed(self.base, batch["input_ids"], batch["prompt_index"], prompts)
        full_mask = prompts.full_mask(batch["attention_mask"])
        dtype = self.base.get_input_embeddings().weight.dtype
        cache = (inject.decoder_prefix_cache(prompts.prefix, spec, self.base.config, len(rows), dtype)
                 if prompts.prefix is not None else DynamicCache(config=self.base.config))
        position_ids = inject.position_ids(full_mask, spec)
        out = self.base(inputs_embeds=embeds, attention_mask=full_mask,
                        position_ids=position_ids[:, prompts.prefix_length:], past_key_values=cache, use_cache=True,
                        return_dict=True, logits_to_keep=1)
        self.steps += 1
        first = _pick(out.logits[:, -1], rows, self.generator)
        return first, out.past_key_values, full_mask, position_ids[:, -1] + 1


def _merge(base, cache, mask, positions, new_cache, new_mask, new_positions):
    """The running batch and joining rows in one cache: columns aligned on the right, the
    shorter side padded on the left with masked zeros."""
    if cache is None:
        return new_cache, new_mask, new_positions
    K_old, K_new = mask.shape[1], new_mask.shape[1]
    K = max(K_old, K_new)
    merged = DynamicCache(config=base.config)
    for i, (old, new) in enumerate(zip(cache.layers, new_cache.layers)):
        keys = torch.cat([_left_pad(old.keys, K), _left_pad(new.keys, K)], dim=0)
        values = torch.cat([_left_pad(old.values, K), _left_pad(new.values, K)], dim=0)
        merged.update(keys, values, i)
    mask = torch.cat([_left_pad_mask(mask, K), _left_pad_mask(new_mask, K)], dim=0)
    return merged, mask, torch.cat([positions, new_positions])


def _left_pad(x: torch.Tensor, K: int) -> torch.Tensor:
    """(B, H, k, D) -> (B, H, K, D) with zeros in front."""
    if x.shape[2] == K:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], K - x.shape[2], x.shape[3]), x], dim=2)


def _left_pad_mask(mask: torch.Tensor, K: int) -> torch.Tensor:
    if mask.shape[1] == K:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], K - mask.shape[1]), mask], dim=1)


__all__ = ["Decoder", "DecodeRow", "Sampling"]
