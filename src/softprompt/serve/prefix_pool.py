"""The prefix pool: each task's key/value prefix stored once on the device and shared by all
of its rows in the decode slots.

What it holds. A deep prompt (P-tuning v2, prefix tuning) and a cached leading segment
(`prompt_cache.py`: an input prompt's virtual tokens and fixed text, computed once) are
keys and values that every row of the task starts from, the same for all of them. Copied
into each row's slot columns, 64 rows of one task held 64 copies and every decode step read
all 64; here each task's prefix is one span of pool columns, and each row's attention takes
the pool's columns of its own task's span beside its own slot columns. Per layer the pool
is (H_kv, N, D_head) keys and values; an additive (R, N) mask (0 on a row's span, the
dtype's minimum elsewhere) picks the span.

The attention over pool and slot together is one softmax over both (`attention.slot_attention`
with ``shared_prefix``): the same numbers as the prefix sitting in the row's own columns,
so a row still equals the row alone.

Spans. A task's span is filled from the first joining row of the task (its prefill cache
starts with the prefix) and kept while any row uses it. A span no row uses stays until
the room is needed (rows of the task that join later reuse it: the pool is the device
level of the prompts' cache); then the spans in use are moved to the front and, if that is
not enough, the pool grows (the step's CUDA graph is captured again, as for slot columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Span:
    """One task's prefix in the pool: columns ``offset .. offset + length - 1``."""

    owner: Any  # the bank entry (kept: its id is the span's key)
    offset: int
    length: int
    users: set[int] = field(default_factory=set)  # the slots whose rows read it


class PrefixPool:
    """Prefixes of the tasks in R decode slots, one span each (see the module docstring).

    Args:
        shapes: per layer (H_kv, D_key, D_value).
        rows: R, the slots.
        columns: N, the first allocation of pool columns.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], rows: int, columns: int, dtype: torch.dtype,
                 device: torch.device):
        self.shapes, self.rows, self.dtype, self.device = shapes, rows, dtype, device
        self.min = torch.finfo(dtype).min
        self.spans: dict[int, Span] = {}  # id(owner) -> span
        self.top = 0  # the first column no span holds
        self._allocate(max(columns, 1))

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def _allocate(self, columns: int) -> None:
        """(Re)allocate N columns (never fewer), keeping what the spans hold in place."""
        old = (self.keys, self.values, self.mask) if hasattr(self, "mask") else None
        self.keys = [torch.zeros(H, columns, Dk, dtype=self.dtype, device=self.device) for H, Dk, _ in self.shapes]
        self.values = [torch.zeros(H, columns, Dv, dtype=self.dtype, device=self.device) for H, _, Dv in self.shapes]
        self.mask = torch.full((self.rows, columns), self.min, dtype=self.dtype, device=self.device)
        if old is not None:
            keys, values, mask = old
            for new, prev in zip(self.keys + self.values, keys + values):
                new[:, : self.top] = prev[:, : self.top]
            self.mask[:, : mask.shape[1]] = mask

    # -- spans ------------------------------------------------------------------------
    def attach(self, slot: int, owner: Any, keys: list[torch.Tensor], values: list[torch.Tensor]) -> bool:
        """The row in `slot` reads `owner`'s prefix: its span, made from `keys` / `values`
        (per layer (H_kv, P, D_head)) if the pool has none yet. Returns True when the pool
        was reallocated (a captured graph read the old tensors)."""
        span = self.spans.get(id(owner))
        grown = False
        if span is None:
            length = keys[0].shape[1]
            grown = self._make_room(length)
            span = self.spans[id(owner)] = Span(owner, self.top, length)
            for pool, new in zip(self.keys + self.values, keys + values):
                pool[:, span.offset : span.offset + length] = new.to(self.dtype)
            self.top += length
        span.users.add(slot)
        self.mask[slot] = self.min
        self.mask[slot, span.offset : span.offset + span.length] = 0
        return grown

    def has(self, owner: Any) -> bool:
        return id(owner) in self.spans

    def detach(self, slot: int) -> None:
        """The row in `slot` ended (or the slot was never attached): it reads no span."""
        for span in self.spans.values():
            span.users.discard(slot)
        self.mask[slot] = self.min

    def reset(self) -> None:
        """No row reads any span (between runs); the spans stay for later rows of their tasks."""
        for span in self.spans.values():
            span.users.clear()
        self.mask.fill_(self.min)

    def _make_room(self, length: int) -> bool:
        """Ensure ``top + length <= N``: drop the spans no row reads and move the others to
        the front, then grow. Returns True when the tensors were reallocated."""
        if self.top + length <= self.columns:
            return False
        kept = sorted((s for s in self.spans.values() if s.users), key=lambda s: s.offset)
        self.spans = {id(s.owner): s for s in kept}
        top = 0
        for span in kept:  # moving left, in order: a span never overwrites one not moved yet
            if span.offset != top:
                for pool in self.keys + self.values:
                    pool[:, top : top + span.length] = pool[:, span.offset : span.offset + span.length].clone()
                span.offset = top
            top += span.length
        self.top = top
        self._remask()
        if self.top + length <= self.columns:
            return False
        self._allocate(max(2 * self.columns, self.top + length))
        return True

    def _remask(self) -> None:
        self.mask.fill_(self.min)
        for span in self.spans.values():
            for slot in span.users:
                self.mask[slot, span.offset : span.offset + span.length] = 0

    def resize(self, moved: dict[int, int], rows: int) -> None:
        """The slots were reallocated (`DecodeSlots.resize`): {old slot: new slot}."""
        self.rows = rows
        for span in self.spans.values():
            span.users = {moved[s] for s in span.users if s in moved}
        self.mask = torch.full((rows, self.columns), self.min, dtype=self.dtype, device=self.device)
        self._remask()


__all__ = ["PrefixPool", "Span"]
