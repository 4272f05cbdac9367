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
step is a replayed CUDA graph; joining rows are prefilled in one forward (`prefill.py`), a
short join replayed from a CUDA graph of its padded shape (`graphed.py`).

Greedy rows give exactly what transformers' `generate()` gives each row alone (tested).

A row that fails fails alone: a joining group whose prefill fails is prefilled row by
row; a row whose callbacks raise (its stream, its stop strings, its task's decoding) or
whose next-token scores are not finite stops with its `error`. A step that fails as a
whole (which row caused it cannot be told) fails the rows in the slots, not the waiting
ones, and the slots are built afresh. `on_done` hears of every row, failed or not.

This file is the loop (join, step, leave); a row, and how a token is picked for it and
handed to it, are `decode_row.py`'s.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..attention import use_slot_attention
from ..errors import ConfigError
from ..transfer import to_host
from .bank import PromptBank
from .decode_row import DecodeRow, hand_token, pick_tokens, report_done, row_logprobs, top_k
from .graphed import Joined, PrefillGraphs, paddable
from .prefill import Prefill
from .sampling import Sampling, TokenLogprob, logprobs_of
from .sibling_products import pack_siblings
from .slots import DecodeSlots, poolable, round_up

log = logging.getLogger(__name__)


@dataclass
class _Launched:
    """A decode step queued on the device whose tokens the host has not read yet.

    Attributes:
        rows: the row in each slot when the step was launched (its tokens are theirs only).
        tokens: (2, R) the step's tokens and whether each row's scores were finite; on a GPU a
            pinned host copy, valid once `ready` has passed.
    """

    rows: list[DecodeRow | None]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: torch.Tensor | None = None  # (R, 1 + 2k) `sampling.logprobs_of`, where a row asks


class Decoder:
    """Runs `DecodeRow`s of a bank's tasks with continuous batching.

    Args:
        bank: the tasks (a causal LM base).
        max_rows: most rows decoding at once.
        admit: called between any two steps with the room for more rows (0 when the slots
            are full: the server answers waiting head requests meanwhile); returns a list of
            at most that many rows (possibly empty). `run` may name another.
        graphs: record the decode step as a CUDA graph on `max_rows` fixed slots kept from
            run to run (default: when the base model is on a CUDA device; on a CPU the fixed
            slots step eagerly); False: the step runs eagerly on as many slots as there are
            rows.
        columns: the slots' first allocation of cache columns (default: the first rows'
            length plus their token budget, rounded up to 64); they grow when rows need more.
        compile: compile the decode step's forward (`DecodeSlots`; fixed slots only) and the
            prefill's (`Prefill`, dynamic shapes: one compile serves every join's rows
            and length); a dict: `torch.compile`'s keyword arguments for both.
        max_join_tokens: most padded tokens (rows x longest row) one join prefills; rows
            beyond it join after the next decode step, so the running rows keep decoding
            through a burst of joins (None: every waiting row that has room joins at once).
        padded_prefill: short joins padded to buckets of rows and length and, with graphs,
            replayed from a CUDA graph per bucket (`graphed.PrefillGraphs`). Default: where
            the decoder uses graphs on a CUDA device and every layer attends to the whole
            cache (no sliding window). True without them (the CPU): padded, run eagerly
            (what tests check).
        shared_prefix: keep each task's deep prefix or cached prompt segment once on the
            device, shared by all its rows (`prefix_pool.py`), instead of a copy in each
            row's slot columns; needs the slot attention (grouped K/V heads, SDPA) and no
            sliding window. Off by default: on an H100 (S1, uncompiled step) it was slower
            than the copies (8,946 vs 14,625 new tok/s): its step reads every span the pool
            keeps, unused ones included, through products SDPA would run faster eagerly.
        sibling_products: with `compile`, the decode step's Q/K/V and gate/up products run
            as one product each, over the base's frozen weights laid side by side
            (`DecodeSlots`, `sibling_products.py`).

    A decoder keeps its slots (and its captured graph) from one `run` to the next when it
    uses graphs: keep one per server. `run` calls are serialised.
    """

    def __init__(self, bank: PromptBank, *, max_rows: int = 64, admit: Callable[[int], list[DecodeRow]] | None = None,
                 graphs: bool | None = None, columns: int | None = None, compile: bool | dict = False,
                 max_join_tokens: int | None = None, padded_prefill: bool | None = None,
                 shared_prefix: bool | None = None, sibling_products: bool = False):
        self.bank = bank
        self.sibling_products = sibling_products
        if compile and sibling_products:  # before any prefill graph is captured: packing moves the weights
            pack_siblings(bank.base)
        self.max_join_tokens = max_join_tokens
        self.compile = compile
        self.base = bank.base
        self.graphs = graphs
        can_pad = paddable(self.base)
        capture = self.uses_graphs and self.base.get_input_embeddings().weight.is_cuda
        if padded_prefill is None:
            padded_prefill = capture and can_pad
        elif padded_prefill and not can_pad:
            raise ConfigError(f"{self.base.config.model_type}: its joins cannot be padded to buckets (a sliding "
                              "window, or positions that do not follow the attention mask)")
        graphed = PrefillGraphs(bank, capture=capture) if padded_prefill else None
        self.prefill = Prefill(bank, compile, graphed)
        # prefills and steps alike: one attention function from the start
        use_slot_attention(bank.base)
        if shared_prefix and not poolable(self.base):
            raise ConfigError(f"{self.base.config.model_type}: a shared prefix pool needs grouped K/V heads under "
                              "SDPA attention and no sliding window")
        self.shared_prefix = bool(shared_prefix)  # opt-in: measured slower on an H100 so far (see PERFORMANCE.md)
        self.max_rows = max_rows
        self.admit = admit
        self.columns = columns
        self.slots: DecodeSlots | None = None
        self.steps = 0  # forward calls of the last run (prefills included), for tests and metrics
        self._rows: list[DecodeRow | None] = []  # the row in each slot
        self._fixed = False  # max_rows slots kept between runs (graph mode), or slots sized to the rows
        self._launched: _Launched | None = None  # a step queued ahead whose tokens are not handed out yet
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
                self._launched = None  # a step launched ahead for rows that ended: its tokens go to no one
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
            self._drop_cancelled(waiting)
            active = sum(r is not None for r in self._rows)
            room = self.max_rows - active
            if admit is not None:  # asked at every step, full slots too: it answers waiting heads meanwhile
                waiting.extend(self._admitted(admit, max(room - len(waiting), 0)))
            if not waiting and not active:
                return
            if waiting and room > 0:
                self._join(self._joining(waiting, room))
                if not waiting or not any(r is not None for r in self._rows):
                    continue  # admit more before the next step if the joiners ended at once
                # rows left waiting by the join's token budget: the decoding rows step first
            self._step()

    def _joining(self, waiting: deque, room: int) -> list[DecodeRow]:
        """The next rows to join: up to `room`, while the join's padded tokens (rows x the
        longest row) stay within `max_join_tokens` (one row at least). The rest wait one
        decode step: a burst of long rows joins in groups between steps instead of
        stalling the running rows for its whole prefill."""
        joining = [waiting.popleft()]
        longest = _length(joining[0])
        while waiting and len(joining) < room:
            longest_after = max(longest, _length(waiting[0]))
            if self.max_join_tokens is not None and (len(joining) + 1) * longest_after > self.max_join_tokens:
                break
            joining.append(waiting.popleft())
            longest = longest_after
        return joining

    @staticmethod
    def _admitted(admit, room: int) -> list[DecodeRow]:
        try:
            return list(admit(room))
        except Exception:  # the hook's own failure: the rows decoding go on without new ones
            log.exception("the admit hook failed; decoding goes on without new rows")
            return []

    def _drop_cancelled(self, waiting: deque) -> None:
        """Rows whose client has gone stop here: before the next step, or before they join."""
        for s, row in enumerate(self._rows):
            if row is not None and row.cancelled():
                self._finish(s)
        for row in [r for r in waiting if r.cancelled()]:
            waiting.remove(row)
            report_done(row)

    def _step(self) -> None:
        """Hand out one step's tokens. On fixed slots the next step is launched before this
        one's tokens are read (`_ahead`), so the device runs it while the host hands tokens
        out, ends rows and admits new ones: a slot whose row ended or changed meanwhile
        computed one step for nothing, and its token goes to no one."""
        try:
            launched = self._launched or self._launch(None)
            self._launched = self._launch(launched) if self._ahead(launched) else None
        except Exception as e:  # which row caused it cannot be told: every row in the slots fails
            self._fail_slots(RuntimeError(f"the decode step failed ({type(e).__name__}: {e}); every row decoding "
                                          "in it was stopped"))
            return
        self.steps += 1
        if launched.ready is not None:
            launched.ready.synchronize()  # the one host wait of a step
        tokens, finite = launched.tokens.tolist()
        logprobs = row_logprobs(launched.rows, tokens, launched.logprobs)
        for s, row in enumerate(launched.rows):
            if row is not None and self._rows[s] is row:
                self._advance(s, tokens[s], bool(finite[s]), logprobs[s])
        self._shrink()

    def _launch(self, before: _Launched | None) -> _Launched:
        """Queue a decode step over every slot and the copy of its tokens to the host;
        `before`: the step queued before it, whose tokens the rows have not received yet."""
        slots = self.slots
        drawn = [int(before is not None and r is not None and before.rows[s] is r) for s, r in enumerate(self._rows)]
        slots.step()
        chosen, finite = pick_tokens(slots.logits, self._rows, slots.greedy, drawn)
        if chosen is not slots.greedy:  # some rows sample: their draws are the next step's tokens
            slots.set_tokens(chosen)
        both = torch.stack([chosen, finite.long()])
        k = top_k(self._rows)
        logprobs = None if k is None else logprobs_of(slots.logits, chosen, k)
        if not both.is_cuda:
            return _Launched(list(self._rows), both, None, logprobs)
        both, logprobs = to_host(both), None if logprobs is None else to_host(logprobs)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(list(self._rows), both, ready, logprobs)

    def _ahead(self, launched: _Launched) -> bool:
        """Launch the next step before reading `launched`'s tokens: on fixed slots (eager
        slots move rows between slots when they resize), and unless every row is sure to end
        with `launched`'s token (its budget reached)."""
        if not self._fixed or any(r is not None and r.sampling.penalised for r in self._rows):
            return False  # a penalised row's next scores depend on the token not read yet
        return any(r is not None and self._rows[s] is r and len(r.tokens) + 1 < r.sampling.max_new_tokens
                   for s, r in enumerate(launched.rows))

    def _advance(self, slot: int, token: int, finite: bool, logprob: TokenLogprob | None = None) -> None:
        """Hand the row in `slot` its new token (and its log-probability, where the row asks);
        it leaves its slot when it is done, or fails alone (non-finite scores, its callbacks
        raising)."""
        if hand_token(self._rows[slot], token, finite, logprob):
            self._finish(slot)

    @staticmethod
    def pick_first(rows: Sequence[DecodeRow], scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows of a one-token budget whose next-token scores (B, V) a forward over them has
        given already (`scoring.launch_scores`): each one's token picked as a prefill's would
        be (its own sampling settings and draw), queued: (n,) tokens, (n,) whether each
        row's scores were finite, and (n, 1 + 2k) log-probabilities (None: no row asks).
        `hand_first` hands them out, with no prefill and no slot."""
        if any(r.sampling.max_new_tokens != 1 for r in rows):
            raise ConfigError("pick_first ends its rows after one token: their budget must be 1")
        first, finite = pick_tokens(scores, rows)
        k = top_k(rows)
        return first, finite, None if k is None else logprobs_of(scores, first, k)

    def hand_first(self, rows: Sequence[DecodeRow], picked: Sequence[torch.Tensor | None]) -> None:
        """`pick_first`'s tensors, read on the host, handed out: each row gets its token (and
        its log-probabilities where asked) and ends; `on_done` hears of every row."""
        first, finite, table = picked
        tokens = first.tolist()
        logprobs = row_logprobs(rows, tokens, table)
        for row, token, ok, logprob in zip(rows, tokens, finite.tolist(), logprobs):
            hand_token(row, token, bool(ok), logprob)
            report_done(row)

    def _join(self, joining: list[DecodeRow]) -> None:
        """Prefill the joining rows and put them into free slots; when the group's prefill
        fails, each row is prefilled alone and the one that fails fails alone."""
        try:
            groups = [(joining, self._prefill(joining))]
        except Exception as e:
            if len(joining) == 1:
                self._fail(joining[0], e)
                return
            log.warning("the prefill of %d joining rows failed (%s: %s); prefilling them one by one",
                        len(joining), type(e).__name__, e)
            groups = []
            for row in joining:
                try:
                    groups.append(([row], self._prefill([row])))
                except Exception as e:
                    self._fail(row, e)
        for rows, (first, finite, logprobs, joined) in groups:
            try:
                slots = self._place(rows, first, joined)
            except Exception as e:  # the slots may be half-changed: every row in them fails, and these
                self._fail_slots(RuntimeError(f"placing joining rows failed ({type(e).__name__}: {e})"))
                for row in rows:
                    self._fail(row, e)
                continue
            tokens = first.tolist()
            logprobs = row_logprobs(rows, tokens, logprobs)
            for s, token, ok, logprob in zip(slots, tokens, finite.tolist(), logprobs):
                self._advance(s, token, ok, logprob)

    def _place(self, joining: list[DecodeRow], first: torch.Tensor, joined: Joined) -> list[int]:
        """Put prefilled rows into free slots (made first if there are none); returns the slots."""
        budget = min(max(r.sampling.max_new_tokens for r in joining), 256)  # grown further as needed
        if self.slots is None:
            graphs = self._fixed = self.uses_graphs
            rows = self.max_rows if graphs else len(joining)
            own = joined.mask.shape[1] - (joined.prefix_length if self.shared_prefix else 0)
            columns = self.columns or round_up(own + budget, 64)
            self.slots = DecodeSlots(self.base, joined, rows, columns, graphs=graphs,
                                     compile=self.compile if graphs else False, shared_prefix=self.shared_prefix,
                                     sibling_products=self.sibling_products)
            self._rows = [None] * rows
        free = self.slots.free_slots()
        if len(free) < len(joining):  # eager slots: make room for the joiners
            self._resize(self.slots.rows - len(free) + len(joining))
            free = self.slots.free_slots()
        slots = free[: len(joining)]
        self.slots.place(slots, joined, joined.mask, first, joined.positions, budget, joined.prefixes())
        for s, row in zip(slots, joining):
            self._rows[s] = row
        return slots

    def _finish(self, slot: int) -> None:
        row = self._rows[slot]
        self._rows[slot] = None
        self.slots.free(slot)
        report_done(row)

    def _fail(self, row: DecodeRow, error: Exception) -> None:
        """A row that never reached a slot (or whose slots are gone) fails alone."""
        row.error = error
        report_done(row)

    def _fail_slots(self, error: Exception) -> None:
        """Every row in the slots fails with `error`; the slots are dropped (their state is
        not trusted) and built afresh for the rows that join next."""
        rows = [r for r in self._rows if r is not None]
        self.slots, self._rows, self._fixed, self._launched = None, [], False, None
        log.error("%s: %d rows failed", error, len(rows))
        for row in rows:
            self._fail(row, error)

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

    def _prefill(self, rows: list[DecodeRow]):
        """The joining rows' prefill (`Prefill`): their first tokens, whether their scores
        were finite (n,), their top log-probabilities where asked, and what the prefill
        hands over (`Joined`: keys and values, mask, next positions)."""
        joined = self.prefill(rows)
        self.steps += 1
        first, finite = pick_tokens(joined.scores, rows)  # (n,) each, a row with non-finite scores fails alone
        k = top_k(rows)
        logprobs = None if k is None else logprobs_of(joined.scores, first, k)
        return first, finite, logprobs, joined


def _length(row: DecodeRow) -> int:
    """A waiting row's tokens (its encoded form's; 1 for a row not encoded yet)."""
    return len(row.encoded.input_ids) if row.encoded is not None else 1


__all__ = ["Decoder", "DecodeRow", "Sampling"]
