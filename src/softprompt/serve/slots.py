"""Decode slots: a fixed-size key/value cache whose batch rows are slots that requests
occupy and leave, and one decode step over all of it, captured as a CUDA graph.

Layout. ``keys`` and ``values`` of every layer are (R, H_kv, C, D_head) tensors allocated
once: R slots, C columns. Every slot's current token is written into the same column
``t`` (the newest column), so a row that joins with K cached columns (its deep prefix or
cached prompt segment, its prompt) is placed in columns ``t-K .. t-1`` and padded on the
left with masked columns. An additive (R, 1, 1, C) attention mask (0 where a row attends,
the dtype's minimum elsewhere) and per-slot position ids make each row see exactly what it
would see alone. A free slot attends only to its own newest column: no row of the batch
reads it and it never divides by zero.

Why fixed shapes: a decode step of a 1B model at batch 64 is ~2 ms of GPU work but several
hundred kernel launches; with a transformers `DynamicCache` the shapes change every step and
the step is bound by Python and launches (~18 ms on an H100). With fixed buffers the whole
step (the base model's forward through `SlotCache`, arg-max, the position and column
updates) is recorded once as a CUDA graph and replayed each step (`torch.cuda.CUDAGraph`).
On the CPU, or where capture fails, the same step runs eagerly on the same buffers.

Prefixes. With a prefix pool (`prefix_pool.py`), a row's deep prefix or cached prompt
segment is not placed in its columns: each task's prefix is stored once in the pool, and
the step's attention reads it beside the row's own columns (`attention.pooled_products`).

Columns run out when ``t`` reaches C: the columns no active row uses any more (left of the
oldest row's start) are dropped by shifting left; when every column is still in use the
buffers grow (and the graph is captured again).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import inject
from ..architecture import forward_accepts
from ..attention import use_slot_attention
from .compiled import regional_call
from .prefix_pool import PrefixPool
from .sibling_products import compiled_with_siblings

log = logging.getLogger(__name__)


class SlotLayer(CacheLayerMixin):
    """One layer's (R, H_kv, C, D_head) keys and values; `update` writes the step's token
    into column ``column`` (a one-element device tensor, so a captured graph reads the
    current value) and returns the whole buffers."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states.to(self.dtype))
        self.values.index_copy_(2, self.column, value_states.to(self.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """The transformers `Cache` a decode step runs on: `SlotLayer`s sharing one column."""

    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)


class DecodeSlots:
    """R slots of C columns for one base model (see the module docstring).

    Args:
        base: the causal LM.
        like: a prefill `DynamicCache` whose layers give the key/value shapes and dtype.
        rows: R, the number of slots.
        columns: C, the initial number of columns.
        graphs: capture the decode step as a CUDA graph (CUDA only).
        compile: compile the base model's forward of the step with `torch.compile` (its
            norms, rotary embedding, activations and residual adds fused) before capture;
            a dict: `torch.compile`'s keyword arguments (e.g. ``{"options": {...}}``).
        shared_prefix: keep each task's prefix once in a `PrefixPool` instead of in every
            row's columns (needs the slot attention on grouped K/V heads, no sliding window).
        sibling_products: with `compile`, the base's weights frozen into the compiled step
            and each layer's Q/K/V and gate/up products run as one product each
            (`sibling_products.py`: their weights are first laid side by side in one buffer,
            same values and memory).

    Host-side state: ``t`` (the newest column), ``start[s]`` (the first column slot s's row
    uses; None: free).
    """

    def __init__(self, base, like: Cache, rows: int, columns: int, *, graphs: bool, compile: bool | dict = False,
                 shared_prefix: bool = False, sibling_products: bool = False):
        self.base = base
        self.rows = rows
        self.graphs = graphs and like.layers[0].keys.is_cuda
        self.device = like.layers[0].keys.device
        self.dtype = like.layers[0].keys.dtype
        self._shapes = [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in like.layers]
        self.min = torch.finfo(self.dtype).min
        self.t = 0
        self.start: list[int | None] = [None] * rows
        self.column = torch.zeros(1, dtype=torch.long, device=self.device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # each slot's current token
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # ... and its position
        self.greedy = torch.zeros(rows, dtype=torch.long, device=self.device)  # arg-max of the last step
        self.logits: torch.Tensor | None = None  # (R, V) of the last step
        self._graph: torch.cuda.CUDAGraph | None = None
        self.window, self._mixed_layers = sliding_window(base.config)
        self._allocate(columns)
        self.keeps_logits = forward_accepts(base, "logits_to_keep")
        self.slot_attention = use_slot_attention(base)  # one-token queries on grouped K/V heads, no copy
        if shared_prefix and (not self.slot_attention or self.window):
            raise ValueError("a shared prefix pool needs the slot attention on grouped K/V heads and no sliding window")
        self.pool = PrefixPool(self._shapes, rows, 64, self.dtype, self.device) if shared_prefix else None
        # Shapes: the first compile is for the buffers' shapes as they are (static kernels); when the columns
        # grow, automatic dynamic shapes compile once more with the column count symbolic: further growth costs
        # a capture, not a compile. "regional": the blocks compiled (`compiled.regional_call`), not the step.
        options = {k: v for k, v in compile.items() if k != "regional"} if isinstance(compile, dict) else {}
        regional = isinstance(compile, dict) and compile.get("regional", False)
        self._model = regional_call(base, options) if regional else base
        self._forward = torch.compile(self._scores, **options) if compile and not regional else self._scores
        if compile and sibling_products and not regional:
            self._forward = compiled_with_siblings(base, self._frozen_scores, options)

    # -- buffers ------------------------------------------------------------------
    @property
    def masks(self) -> list[torch.Tensor]:
        """The (R, 1, 1, C) attention masks kept: all columns, and the sliding window's."""
        return [self.mask] if self.window_mask is None else [self.mask, self.window_mask]

    @property
    def columns(self) -> int:
        return self.mask.shape[-1]

    def _allocate(self, columns: int, old: tuple | None = None):
        """(Re)allocate C columns, copying `old` buffers' columns to the same places."""
        kv = []
        for H, Dk, Dv in self._shapes:
            kv.append((torch.zeros(self.rows, H, columns, Dk, dtype=self.dtype, device=self.device),
                       torch.zeros(self.rows, H, columns, Dv, dtype=self.dtype, device=self.device)))
        mask = torch.full((self.rows, 1, 1, columns), self.min, dtype=self.dtype, device=self.device)
        if old is not None:
            old_kv, old_mask = old[:2]
            n = old_mask.shape[-1]
            for (k, v), (ok, ov) in zip(kv, old_kv):
                k[:, :, :n] = ok
                v[:, :, :n] = ov
            mask[..., :n] = old_mask
        self.kv, self.mask = kv, mask
        self.window_mask = mask.clone() if self.window else None
        if self.window and old is not None:
            self.window_mask[..., :n] = old[2]
        self.cache = SlotCache([SlotLayer(k, v, self.column) for k, v in kv])
        self._graph = None  # captured on the old buffers' addresses

    def _shift(self, d: int) -> None:
        """Move every column d to the right (d > 0) or -d to the left (d < 0)."""
        t, C = self.t, self.columns
        if d > 0:
            if t + d > C:
                raise RuntimeError("no room to shift")  # callers grow first
            for k, v in self.kv:
                k[:, :, d : t + d] = k[:, :, :t].clone()
                v[:, :, d : t + d] = v[:, :, :t].clone()
            for m in self.masks:
                m[..., d : t + d] = m[..., :t].clone()
                m[..., :d] = self.min
        elif d < 0:
            d = -d
            for k, v in self.kv:
                k[:, :, : t - d] = k[:, :, d:t].clone()
                v[:, :, : t - d] = v[:, :, d:t].clone()
            for m in self.masks:
                m[..., : t - d] = m[..., d:t].clone()
                m[..., t - d :] = self.min
            d = -d
        self.t += d
        self.start = [None if s is None else s + d for s in self.start]
        self.column.fill_(self.t)

    def _grow(self, columns: int) -> None:
        self._allocate(columns, (self.kv, self.mask, self.window_mask))

    def _compact(self) -> None:
        """Drop the columns left of the oldest row's start (no row reads them)."""
        used = [s for s in self.start if s is not None]
        lead = min(used) if used else self.t
        if lead:
            self._shift(-lead)

    def make_room(self, columns: int) -> None:
        """Ensure ``t + columns <= C``: drop the columns no row uses, then grow."""
        if self.t + columns <= self.columns:
            return
        self._compact()
        if self.t + columns > self.columns:
            self._grow(round_up(self.t + columns, 64))

    # -- rows -----------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [s for s, start in enumerate(self.start) if start is None]

    def place(self, slots: list[int], cache: Cache, mask: torch.Tensor, first: torch.Tensor,
              positions: torch.Tensor, room: int, prefixes: list[tuple[object, int]] | None = None) -> None:
        """Put prefilled rows into `slots`.

        Args:
            cache: the rows' prefill cache, layers of (n, H_kv, K, D_head).
            mask: (n, K) 1 where a row attends among its K columns.
            first: (n,) each row's first new token (its current token: written next step).
            positions: (n,) that token's position.
            room: columns the rows may still add (their longest token budget).
            prefixes: with a prefix pool, each row's prefix owner (its bank entry) and its
                prefix length, the row's last of the P leading prefix columns of the cache
                (P the longest); those P columns go to the pool, not to the slots.
        """
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if self.pool is not None:
            mask, layers = self._attach(slots, layers, mask, prefixes or [(None, 0)] * len(slots))
        K = mask.shape[1]
        if max(self.t, K) + room > self.columns:
            self._compact()
            if max(self.t, K) + room > self.columns:
                self._grow(round_up(max(self.t, K) + room, 64))
        if K > self.t:  # the joining rows are longer than the running ones: move those right
            self._shift(K - self.t)
        t = self.t
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        for (k, v), (keys, values) in zip(self.kv, layers):
            k[index] = 0  # what a previous row left: masked anyway, zero for clarity
            v[index] = 0
            k[index, :, t - K : t] = keys.to(self.dtype)
            v[index, :, t - K : t] = values.to(self.dtype)
        row_mask = torch.full((len(slots), 1, 1, self.columns), self.min, dtype=self.dtype, device=self.device)
        row_mask[:, 0, 0, t - K : t] = torch.where(mask.bool(), 0.0, self.min).to(self.dtype)
        for m in self.masks:
            m[index] = row_mask
        if self.window:  # what the window already left behind
            self.window_mask[index, ..., : max(0, t - self.window)] = self.min
        self.ids[index] = first.view(-1, 1)
        self.pos[index] = positions.view(-1, 1)
        first_used = (mask.long().cumsum(1) == 0).sum(1).tolist()  # leading masked columns of each row
        for s, lead in zip(slots, first_used):
            self.start[s] = t - K + lead

    def _attach(self, slots: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                prefixes: list[tuple[object, int]]):
        """Give each row its task's span in the pool (filled from the row's own leading
        columns when the pool has none), and return the mask and layers without the P
        prefix columns (P: the longest row's prefix; shorter ones are padded in front)."""
        P = max(length for _, length in prefixes)
        for i, (slot, (owner, length)) in enumerate(zip(slots, prefixes)):
            self.pool.detach(slot)
            if length:
                span = [(k[i, :, P - length : P], v[i, :, P - length : P]) for k, v in layers]
                if self.pool.attach(slot, owner, [k for k, _ in span], [v for _, v in span]):
                    self._graph = None  # the pool's tensors were reallocated
        return mask[:, P:], [(k[:, :, P:], v[:, :, P:]) for k, v in layers]

    def reset(self) -> None:
        """Every slot free, the newest column back to 0 (between runs)."""
        self.start = [None] * self.rows
        if self.pool is not None:
            self.pool.reset()
        for m in self.masks:
            m.fill_(self.min)
        self.t = 0
        self.column.fill_(0)

    def free(self, slot: int) -> None:
        """The row in `slot` ended: the slot attends to nothing but its newest column."""
        self.start[slot] = None
        for m in self.masks:
            m[slot] = self.min
        if self.pool is not None:
            self.pool.detach(slot)

    def resize(self, rows: int) -> dict[int, int]:
        """Reallocate for `rows` slots (eager decoding sizes them to the rows it holds);
        occupied slots move to the front. Returns {old slot: new slot}."""
        occupied = [s for s, start in enumerate(self.start) if start is not None]
        if len(occupied) > rows:
            raise ValueError(f"{len(occupied)} rows do not fit in {rows} slots")
        index = torch.tensor(occupied, dtype=torch.long, device=self.device)
        n = len(occupied)

        def moved(x: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((rows, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
            out[:n] = x.index_select(0, index)
            return out

        self.kv = [(moved(k, 0), moved(v, 0)) for k, v in self.kv]
        self.mask = moved(self.mask, self.min)
        self.window_mask = moved(self.window_mask, self.min) if self.window else None
        self.ids, self.pos, self.greedy = moved(self.ids, 0), moved(self.pos, 0), moved(self.greedy, 0)
        self.logits = None
        self.start = [self.start[s] for s in occupied] + [None] * (rows - n)
        self.rows = rows
        self.cache = SlotCache([SlotLayer(k, v, self.column) for k, v in self.kv])
        self._graph = None
        moved = {s: i for i, s in enumerate(occupied)}
        if self.pool is not None:
            self.pool.resize(moved, rows)
        return moved

    def set_tokens(self, tokens: torch.Tensor) -> None:
        """Overwrite the next step's tokens (R,) (the step put its arg-max there: rows that
        sample drew others)."""
        self.ids.copy_(tokens.view(-1, 1))

    # -- the step ---------------------------------------------------------------------
    def _scores(self) -> torch.Tensor:
        """(R, V) next-token scores of every slot: the base model's forward over the step's
        tokens (R, 1), writing their keys and values into column ``column``."""
        extra: dict[str, Any] = {"logits_to_keep": 1} if self.keeps_logits else {}
        if self.pool is not None:  # reaches the slot attention of every layer (transformers passes it down)
            extra["shared_prefix"] = self.pool
        if self._mixed_layers:  # full and sliding-window layers: a mask for each kind
            mask: Any = {"full_attention": self.mask, "sliding_attention": self.window_mask}
        else:
            mask = self.window_mask if self.window else self.mask
        out = self._model(input_ids=self.ids, attention_mask=mask, position_ids=self.pos,
                          use_cache=True, return_dict=True, **{inject.CACHE_ARG: self.cache}, **extra)
        return out.logits[:, -1]

    def _frozen_scores(self) -> torch.Tensor:
        """`_scores` under a code object of its own: dynamo keys its compiled versions by
        code object and guards, not by the compiler's settings, so the version compiled with
        frozen weights and fused products must not be found for a plain compile, or the
        other way round."""
        return self._scores()

    def _body(self) -> None:
        """One decode step over every slot (what the CUDA graph records)."""
        for m in self.masks:
            m.index_fill_(3, self.column, 0.0)  # each row attends to its newest token
        logits = self._forward()
        if self.logits is None or self.logits.shape != logits.shape:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        self.greedy.copy_(logits.argmax(-1))
        self.ids.copy_(self.greedy[:, None])
        self.pos.add_(1)
        self.column.add_(1)

    def step(self) -> None:
        """Advance every slot by one token: ``greedy`` (R,) and ``logits`` (R, V) hold the
        result, and ``ids`` the arg-max as the next step's tokens."""
        self.make_room(1)
        if self.window and self.t >= self.window:  # the column that leaves every row's window
            self.window_mask[..., self.t - self.window] = self.min
        if self.graphs and self._graph is None:
            self._capture()
        if self.graphs and self._graph is not None:
            self._graph.replay()
        elif self._forward is self._scores:
            self._body()
        else:  # compiled, stepping eagerly: compilation fails before the forward changes anything
            try:
                self._body()
            except Exception as e:
                log.warning("decode step not compiled (%s: %s); running it uncompiled", type(e).__name__, e)
                self._forward = self._scores
                self._body()
        self.t += 1

    def _capture(self) -> None:
        """Record `_body` as a CUDA graph on the current buffers. Warm-up and capture run
        the step for real, so the state they change is put back afterwards (the keys and
        values they write land in column t, which the real step overwrites)."""
        state = (self.ids, self.pos, self.column, *self.masks)
        saved = [x.clone() for x in state]

        def restore():
            for x, s in zip(state, saved):
                x.copy_(s)

        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # kernels pick their algorithms, workspaces are allocated
                    self._body()
                    restore()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            restore()
            self._graph = graph
        except Exception as e:  # a family whose forward cannot be compiled or captured: run it as it is
            torch.cuda.synchronize(self.device)
            restore()
            self._graph = None
            if self._forward is not self._scores:  # compiled: capture the step uncompiled instead
                log.warning("decode step not compiled (%s: %s); capturing it uncompiled", type(e).__name__, e)
                self._forward = self._scores
                self._capture()
                return
            log.warning("decode step not captured as a CUDA graph (%s: %s); running it eagerly", type(e).__name__, e)
            self.graphs = False


def sliding_window(config) -> tuple[int | None, bool]:
    """(window, mixed): the sliding window of a family's attention layers (None: full
    attention everywhere), and whether full and windowed layers are mixed. The window
    counts cache columns, as transformers' own masks do."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if "sliding_attention" not in kinds:
        return None, False
    return int(window), len(kinds) > 1


def poolable(base) -> bool:
    """Whether a `PrefixPool` can serve `base`'s decode steps: the slot attention on
    grouped K/V heads (what reads the pool) and no sliding window."""
    return use_slot_attention(base) and sliding_window(base.config)[0] is None


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` at least `n` (slot buffers grow in steps of 64 columns)."""
    return -(-n // multiple) * multiple


__all__ = ["DecodeSlots", "SlotCache", "SlotLayer"]
