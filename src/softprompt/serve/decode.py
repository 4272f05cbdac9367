"""Continuous batching for causal LMs: one decode loop over rows of many tasks.

Rows join the running batch when there is room (their prompt is prefilled in one forward
and their keys and values merged into the shared cache) and leave it as soon as they end
(end of sequence, a stop string, their token budget, a client gone): the batch never
carries finished rows, and waiting rows do not wait for the whole batch to end. Each row
keeps its own sampling settings (greedy, or temperature / top-k / top-p) and its own random
stream (`sampling.py`): a seeded row gives the same tokens alone and in any batch.

The running batch lives in fixed decode slots (`slots.py`): rows of different lengths are
aligned on the right (the newest column is every row's current token), shorter ones padded
on the left with masked columns; each row carries its own position. On a GPU the decode
step is a replayed CUDA graph; joining rows are prefilled eagerly (their lengths vary).

Greedy rows give exactly what transformers' `generate()` gives each row alone (tested).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import inject
from ..encode import EncodedRow
from .bank import PromptBank
from .mixed import collate_mixed, encode_mixed
from .sampling import Draws, NonFiniteScoresError, Sampling, sample
from .slots import DecodeSlots, round_up


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
    result: Any = None  # what on_done made of the row (the engine's Result)
    encoded: EncodedRow | None = None  # the row already encoded by its task (else encoded here)
    entry: Any = None  # the task's BankEntry when the row was checked (pinned: see PromptBank.entry)


def _pick(logits: torch.Tensor, rows: Sequence[DecodeRow | None],
          greedy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits of `rows` (None: an empty slot) -> (B,) next tokens (arg-max for greedy
    rows, each sampling row's own draw for its next token index) and a (B,) bool mask, False
    where a row's scores were not finite (`sampling.sample`); `greedy`: the arg-max, if known."""
    draws = Draws.of([None if r is None else r.sampling for r in rows],
                     [0 if r is None else len(r.tokens) for r in rows], logits.device)
    return sample(logits, draws, greedy)


class Decoder:
    """Runs `DecodeRow`s of a bank's tasks with continuous batching.

    Args:
        bank: the tasks (a causal LM base).
        max_rows: most rows decoding at once.
        admit: called between steps for more rows when there is room (the server's queue);
            returns a list of rows (possibly empty). `run` may name another.
        graphs: record the decode step as a CUDA graph on `max_rows` fixed slots kept from
            run to run (default: when the base model is on a CUDA device; on a CPU the fixed
            slots step eagerly); False: the step runs eagerly on as many slots as there are
            rows.
        columns: the slots' first allocation of cache columns (default: the first rows'
            length plus their token budget, rounded up to 64); they grow when rows need more.

    A decoder keeps its slots (and its captured graph) from one `run` to the next when it
    uses graphs: keep one per server. `run` calls are serialised.
    """

    def __init__(self, bank: PromptBank, *, max_rows: int = 64, admit: Callable[[int], list[DecodeRow]] | None = None,
                 graphs: bool | None = None, columns: int | None = None):
        self.bank = bank
        self.base = bank.base
        self.max_rows = max_rows
        self.admit = admit
        self.graphs = graphs
        self.columns = columns
        self.slots: DecodeSlots | None = None
        self.steps = 0  # forward calls of the last run (prefills included), for tests and metrics
        self._rows: list[DecodeRow | None] = []  # the row in each slot
        self._fixed = False  # max_rows slots kept between runs (graph mode), or slots sized to the rows
        self._lock = threading.Lock()

    @property
    def uses_graphs(self) -> bool:
        if self.graphs is not None:
            return self.graphs
        return self.base.get_input_embeddings().weight.is_cuda

    @torch.no_grad()
    def run(self, rows: Sequence[DecodeRow], admit: Callable[[int], list[DecodeRow]] | None = None) -> list[DecodeRow]:
        """Decode every row (and any the `admit` hook adds); each row's `tokens` holds its
        new tokens (without the end-of-sequence token) when it returns."""
        admit = admit or self.admit
        with self._lock:
            try:
                self._loop(deque(rows), admit)
            finally:
                self._rows = [None] * len(self._rows)
                if self.slots is not None:
                    if self._fixed:  # fixed slots (and their graph) serve the next run
                        self.slots.reset()
                    else:  # slots sized to this run's rows: give the memory back
                        self.slots, self._rows = None, []
        return list(rows)

    def _loop(self, waiting: deque, admit) -> None:
        self.steps = 0
        while True:
            active = sum(r is not None for r in self._rows)
            room = self.max_rows - active
            if room > len(waiting) and admit is not None:
                waiting.extend(admit(room - len(waiting)))
            if not waiting and not active:
                return
            if waiting and room > 0:
                self._join([waiting.popleft() for _ in range(min(room, len(waiting)))])
                continue  # admit more before the next step if the joiners ended at once
            self._step()

    def _step(self) -> None:
        slots = self.slots
        slots.step()
        self.steps += 1
        chosen, finite = _pick(slots.logits, self._rows, slots.greedy)
        if chosen is not slots.greedy:  # some rows sample: their draws are the next step's tokens
            slots.set_tokens(chosen)
        tokens, finite = torch.stack([chosen, finite.long()]).tolist()  # the one host synchronisation of a step
        failed = [row for row, ok in zip(self._rows, finite) if row is not None and not ok]
        if failed:
            self._not_finite(failed)
        for s, row in enumerate(self._rows):
            if row is not None and self._emit(row, tokens[s]):
                self._finish(s)
        self._shrink()

    def _join(self, joining: list[DecodeRow]) -> None:
        """Prefill the joining rows and put them into free slots."""
        first, cache, mask, positions = self._prefill(joining)
        budget = min(max(r.sampling.max_new_tokens for r in joining), 256)  # grown further as needed
        if self.slots is None:
            graphs = self._fixed = self.uses_graphs
            rows = self.max_rows if graphs else len(joining)
            columns = self.columns or round_up(mask.shape[1] + budget, 64)
            self.slots = DecodeSlots(self.base, cache, rows, columns, graphs=graphs)
            self._rows = [None] * rows
        free = self.slots.free_slots()
        if len(free) < len(joining):  # eager slots: make room for the joiners
            self._resize(self.slots.rows - len(free) + len(joining))
            free = self.slots.free_slots()
        slots = free[: len(joining)]
        self.slots.place(slots, cache, mask, first, positions, budget)
        for s, row, token in zip(slots, joining, first.tolist()):
            self._rows[s] = row
            if self._emit(row, token):
                self._finish(s)

    def _finish(self, slot: int) -> None:
        row = self._rows[slot]
        self._rows[slot] = None
        self.slots.free(slot)
        if row.on_done is not None:
            row.on_done(row)

    def _shrink(self) -> None:
        """Eager slots follow the rows: a quarter used, halve them (the step's cost is per slot)."""
        active = sum(r is not None for r in self._rows)
        if not self._fixed and active and active <= self.slots.rows // 4:
            self._resize(2 * active)

    def _resize(self, rows: int) -> None:
        moved = self.slots.resize(rows)
        placed: list[DecodeRow | None] = [None] * rows
        for old, new in moved.items():
            placed[new] = self._rows[old]
        self._rows = placed

    def _emit(self, row: DecodeRow, token: int) -> bool:
        """Hand a row its new token; True when the row is done."""
        s = row.sampling
        if s.eos_token_id is not None and token == s.eos_token_id:
            return True
        row.tokens.append(token)
        return bool(row.on_token(token)) or len(row.tokens) >= s.max_new_tokens

    def _not_finite(self, rows: list[DecodeRow]) -> None:
        """Rows whose scores were not finite this step (NaN or infinity in the model's logits,
        or in logits / T): their token means nothing. HOOK for failing such rows alone (issue
        18, failure isolation); until that is wired the step fails, and the run with it."""
        raise NonFiniteScoresError(f"the model's scores are not finite (NaN or infinity) for {len(rows)} row(s) "
                                   f"of task(s) {sorted({r.task for r in rows})}")

    def _prefill(self, rows: list[DecodeRow]):
        """One forward over the joining rows with their prompts: their first tokens, cache,
        attention mask over the cache (prefix + row) and next positions."""
        # by pinned entry where the row has one: a task removed while its row waited to
        # join must not fail the rows joining with it (nor those decoding already)
        names = [r.entry if r.entry is not None else r.task for r in rows]
        if all(r.encoded is not None for r in rows):
            batch = collate_mixed(self.bank, names, [r.encoded for r in rows], padding_side="left")
        else:
            batch = encode_mixed(self.bank, names, [r.example for r in rows], padding_side="left")
        model = self.bank.entry(names[0]).model
        inputs = inject.base_inputs(self.base, model.spec, batch["input_ids"], batch["attention_mask"],
                                    batch["prompt_index"], self.bank.prompts_for(batch.entries), keep_cache=True,
                                    logits_to_keep=1 if model.keeps_logits else None)
        out = self.base(**inputs)
        self.steps += 1
        first, finite = _pick(out.logits[:, -1], rows)
        if not bool(finite.all()):  # a host synchronisation per join, not per step (the join has more)
            self._not_finite([r for r, ok in zip(rows, finite.tolist()) if not ok])
        return first, inject.output_cache(out), inputs["attention_mask"], inputs["position_ids"][:, -1] + 1


__all__ = ["Decoder", "DecodeRow", "Sampling"]
