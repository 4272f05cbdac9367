"""Padding-free packing: the rows of a batch laid end to end in a few long sequences, each
row (a *segment*) attending only to itself and, with a deep prompt, to the prefix.

Short rows waste most of a padded batch (SST-2 rows are 5-60 tokens, padded to the longest
of the batch). A packed forward runs the base model on (N, W) columns holding the real
tokens of the B rows (N << B), so the frozen model's work follows the tokens, not B x S.

The layout is one tensor, ``pack_index`` (N, W): the flat index ``b * S + s`` of the padded
batch's column that each packed column holds, -1 for the packed sequences' own padding. A
packed batch is the padded `PromptBatch` plus its ``pack_index``: everything a loss reads
(labels aligned to real tokens, answer slots, pooling masks) stays in the padded layout, and
the forward scatters its last-layer states back to (B, S) before any head reads them. The
loss of a packed batch is therefore *the same function* of the same states as the padded
batch's: same per-token weighting, the same gradients up to floating-point reordering
(tested for every method on the causal families and the encoders, `tests/test_packing.py`).

What each segment sees, exactly as its padded row:

* positions: the padded row's own (`inject.position_ids`: counting from the deep prefix's
  P, or from the virtual slots that are part of the row; RoBERTa's offset included),
  gathered to the packed columns, so they restart at each segment;
* input prompts: each segment carries its virtual slots (its ``prompt_index``), so each gets
  its own copy of the prompt rows, placed by `inject.embed` as in the padded batch;
* attention: block-diagonal (causal within a segment for decoders, bidirectional for
  encoders); with a deep prompt every segment also attends to the P prefix columns, which
  are stored once per packed sequence (the read-only `inject.PrefixCache`, views). The mask
  is transformers' own machinery (`masking_utils`: ``packed_sequence_mask_function``,
  ``causal_mask_function``, ``or_masks`` / ``and_masks``) materialised by the model's
  attention implementation's mask function: a (N, 1, W, P + W) boolean mask for SDPA, an
  additive one for eager attention, a `BlockMask` for ``flex_attention`` (blocks no segment
  reads are skipped; its backward runs on GPUs only). Pad columns of a packed sequence attend to each other
  (never to a segment), so no query row is all masked (an all-masked row gives NaN, and a
  NaN value times a zero weight is NaN: pads must stay finite).

The packer (`pack_rows`) bins the rows of one micro-batch, first-fit decreasing by length,
into sequences of at most ``budget`` tokens (a longer row gets a sequence of its own). It
changes the layout of a micro-batch, never which examples it holds: the data order, its
seeding and the resumable loop's position (`training.order`) are those of the padded run.

Not packed (`refusal` says why; the training loop then pads, with one logged line):
encoder-decoders, models whose attention implementation ignores 4-D masks (flash
attention reads sequence boundaries from position ids alone and cannot add a prefix to
each segment), sliding-window families (the window would need the prefix's distance to each
segment), and families that take no position ids.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import torch
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    or_masks,
    packed_sequence_mask_function,
)

from . import inject
from .architecture import ModelKind, ModelSpec
from .errors import ConfigError
from .transfer import to_device

#: attention implementations that take the 4-D mask of a packed forward as it is
MASKED_ATTENTION = ("sdpa", "eager", "sdpa_packed_gqa", "flex_attention")
_PREFIX = -2  # segment id of the deep prefix's columns (a pad column is -1, a row b is b)


def refusal(base, spec: ModelSpec) -> str | None:
    """Why `base` cannot run packed forwards, or None when it can."""
    implementation = getattr(base.config, "_attn_implementation", None)
    if spec.kind is ModelKind.SEQ2SEQ:
        return f"{spec.model_type} is an encoder-decoder (packing covers causal LMs and encoders)"
    if implementation not in MASKED_ATTENTION:
        return (f"attention implementation {implementation!r} does not take a 4-D mask (packing needs one of "
                f"{', '.join(MASKED_ATTENTION)})")
    if spec.sliding_window_layers:
        return f"{spec.model_type} has sliding-window layers (their window is not carried into a packed mask)"
    if not spec.accepts_position_ids:
        return f"{spec.model_type} takes no position ids (each segment's positions must restart)"
    return None


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bin rows into packed sequences: first-fit decreasing by length.

    Args:
        lengths: each row's tokens (virtual slots included).
        budget: most tokens of a packed sequence; a longer row gets a sequence of its own,
            and its length is then the budget of every sequence.

    Returns:
        The packed sequences, each a list of row numbers in increasing order; a pure
        function of its arguments (ties broken by row number).
    """
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"train.pack_tokens must be a positive integer, got {budget!r}")
    # a row longer than the budget makes every packed sequence that long (they share one
    # width): the others may then fill up to it too, at no cost
    budget = max([budget, *lengths])
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        fit = next((i for i, left in enumerate(room) if lengths[row] <= left), None)
        if fit is None:
            bins.append([row])
            room.append(budget - lengths[row])
        else:
            bins[fit].append(row)
            room[fit] -= lengths[row]
    return [sorted(b) for b in bins]


def pack_index(attention_mask: torch.Tensor, lengths: Sequence[int], budget: int) -> torch.Tensor:
    """The packed layout of a padded batch (see the module docstring).

    Args:
        attention_mask: (B, S) the padded batch's mask, padded on either side.
        lengths: (B,) its rows' token counts, on the host (``attention_mask.sum(1)``).
        budget: `pack_rows`'s.

    Returns:
        (N, W) long, on the mask's device: the flat index ``b * S + s`` of the padded column
        each packed column holds, -1 for padding; W is the longest packed sequence. Built on
        the host from `lengths` and finished on the device without waiting for it.
    """
    bins = pack_rows(list(lengths), budget)
    width = max(sum(lengths[r] for r in b) for b in bins)
    rows = torch.full((len(bins), width), -1, dtype=torch.long)  # (N, W) row of each packed column
    nth = torch.zeros((len(bins), width), dtype=torch.long)  # (N, W) its rank among the row's tokens
    for n, members in enumerate(bins):
        at = 0
        for r in members:
            rows[n, at: at + lengths[r]] = r
            nth[n, at: at + lengths[r]] = torch.arange(lengths[r])
            at += lengths[r]
    rows, nth = to_device(rows, attention_mask.device), to_device(nth, attention_mask.device)
    S = attention_mask.shape[1]
    # each row's real columns first, in order (a stable sort on "is a pad"): (B, S)
    columns = torch.sort((attention_mask == 0).to(torch.int8), dim=1, stable=True).indices
    flat = rows.clamp(min=0) * S + columns[rows.clamp(min=0), nth]
    return flat.masked_fill(rows < 0, -1)


def gather_columns(x: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    """(B, S, ...) per-column values of the padded batch -> (N, W, ...) at the packed
    columns `index` (`pack_index`), `fill` at the packed sequences' padding; differentiable."""
    pad = (index < 0).view(*index.shape, *[1] * (x.dim() - 2))
    return x.reshape(-1, *x.shape[2:])[index.clamp(min=0)].masked_fill(pad, fill)


def unpack(packed: torch.Tensor, index: torch.Tensor, batch_size: int, length: int) -> torch.Tensor:
    """(N, W, ...) outputs of a packed forward -> (B, S, ...) in the padded layout, zeros at
    the padded batch's pads; differentiable (a scatter of the packed rows)."""
    flat = packed.reshape(-1, *packed.shape[2:])
    dump = batch_size * length  # one extra row takes the packed padding (no boolean index: no wait for the device)
    where = index.reshape(-1).masked_fill(index.reshape(-1) < 0, dump)
    out = flat.new_zeros(dump + 1, *packed.shape[2:]).index_copy(0, where, flat)
    return out[:dump].view(batch_size, length, *packed.shape[2:])


def segment_mask(base, segments: torch.Tensor, prefix_length: int, causal: bool, dtype: torch.dtype) -> Any:
    """The packed forward's 4-D attention mask, from transformers' mask functions.

    Args:
        segments: (N, W) the row (segment) of each packed column, -1 for padding.
        prefix_length: P deep-prefix columns in front of every packed sequence (0: none).
        causal: causal within a segment (decoders), else bidirectional (encoders).

    Returns:
        What the model's attention implementation takes: (N, 1, W, P + W) boolean for SDPA
        (True: attend), additive for eager attention, a `BlockMask` for flex attention.
    """
    N, W = segments.shape
    P = prefix_length
    columns = torch.cat([segments.new_full((N, P), _PREFIX), segments], dim=1)  # (N, P + W)
    # q and kv are columns of the P + W keys (queries sit at P..P + W - 1): within its own segment
    within = and_masks(causal_mask_function if causal else bidirectional_mask_function,
                       packed_sequence_mask_function(columns))
    mask_function: Callable = within if not P else or_masks(_before(P), within)
    make = ALL_MASK_ATTENTION_FUNCTIONS[base.config._attn_implementation]
    if "cache_position" in inspect.signature(make).parameters:  # transformers before q_length / q_offset (5.x)
        queries = dict(cache_position=torch.arange(P, P + W, device=segments.device))
    else:
        queries = dict(q_length=W, q_offset=P)
    return make(batch_size=N, kv_length=P + W, kv_offset=0, mask_function=mask_function, attention_mask=None,
                allow_is_causal_skip=False, allow_is_bidirectional_skip=False, dtype=dtype, config=base.config,
                device=segments.device, **queries)


def _before(prefix_length: int) -> Callable:
    """Mask function: every query attends to the deep prefix's columns."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < prefix_length

    return inner


def packed_inputs(base, spec: ModelSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_index: torch.Tensor, prompts: inject.Prompts, index: torch.Tensor,
                  logits_to_keep: int | None = None) -> dict[str, Any]:
    """The base model's keyword arguments for the packed forward of a padded batch.

    Args:
        input_ids, attention_mask, prompt_index: (B, S) the padded batch.
        index: (N, W) its `pack_index`.
        logits_to_keep: as `inject.base_inputs`'s (a causal LM whose head runs outside).

    Returns:
        `inject.base_inputs` of the (N, W) packed columns (embeddings with each segment's
        input prompts, the deep prefix's read-only cache for N sequences), with the
        segments' own positions and the `segment_mask`.
    """
    if prompts.tables is not None and prompts.tables.dim() != 2:
        raise ConfigError("a packed forward takes one input prompt table for every row (P, D), not one per row")
    if prompts.prefix is not None and (prompts.prefix.dim() != 5 or prompts.prefix_mask is not None):
        raise ConfigError("a packed forward takes one deep prefix for every row (L, 2, H_kv, P, D_head)")
    P = prompts.prefix_length
    real = index >= 0  # (N, W)
    ids = gather_columns(input_ids, index, 0)
    # DePT's delta goes to a row's j-th real token: j is counted on the padded rows, where a
    # row is alone (along a packed sequence it would run on across the segments before it)
    delta, prompts = prompts.input_delta, dataclasses.replace(prompts, input_delta=None)
    inputs = inject.base_inputs(base, spec, ids, real.long(), gather_columns(prompt_index, index, -1), prompts,
                                logits_to_keep=logits_to_keep)
    if delta is not None:
        embeds = inputs["inputs_embeds"]
        added = inject.add_input_delta(embeds.new_zeros(*input_ids.shape, embeds.shape[-1]), attention_mask,
                                       prompt_index, delta)  # (B, S, D): the delta alone, on the padded rows
        inputs["inputs_embeds"] = embeds + gather_columns(added, index, 0)
    positions = inject.position_ids(prompts.full_mask(attention_mask), spec)[:, P:]  # (B, S) the padded rows'
    inputs["position_ids"] = gather_columns(positions, index, spec.position_offset)
    segments = torch.div(index, input_ids.shape[1], rounding_mode="floor").masked_fill(~real, -1)
    inputs["attention_mask"] = segment_mask(base, segments, P, spec.kind is ModelKind.CAUSAL,
                                            inputs["inputs_embeds"].dtype)
    return inputs


__all__ = ["refusal", "pack_rows", "pack_index", "gather_columns", "unpack", "segment_mask", "packed_inputs"]
