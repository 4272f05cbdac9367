"""THE one place where prompts enter the frozen model.

Two kinds of prompt, each through the base model's public interface:

* input prompts: rows of embeddings placed into the virtual slots of ``inputs_embeds``
  (one `torch.where` over a per-row gather, so rows of one batch may use different tables),
  and, for DePT, an additive input delta over each row's real tokens (`add_input_delta`);
* deep prompts: a key/value prefix for every self-attention layer, handed over as a
  transformers `Cache` pre-filled with the prefix, with the attention mask extended by P.
  Encoder stacks that drop caches in their public forward (T5, BART encoders) receive the
  same Cache through a forward pre-hook on their self-attention modules, registered only
  for the duration of one call.

Convention: a deep prefix occupies positions ``0..P-1`` (as in the papers' code and PEFT),
so the real tokens of a row start at position P; input prompts occupy their slots'
positions. Position ids always count only attended tokens, so left padding never
shifts them.

`base_inputs` is the one builder of a single-stack forward's inputs (causal LM or encoder):
a training or scoring forward (`forward.run`), a decoder's prefill (`serve/decode.py`) and a
cached leading segment (`serve/prompt_cache.py`) all call the base model with what it
returns.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .architecture import ModelKind, ModelSpec, tensor_parallel_mesh
from .errors import UnsupportedModelError

# The name under which transformers takes and returns a Cache. 5.24 renamed
# ``past_key_values`` to ``cache`` (the old argument still works until 5.40, with a warning
# on every call; outputs carry only the new one). Every call of ours uses this one name,
# read off the installed version, so both sides of the rename work.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output) -> Cache | None:
    """The Cache a base model's forward returned (under either name, see `CACHE_ARG`)."""
    return getattr(output, CACHE_ARG, None)


@dataclass
class Prompts:
    """The prompts of one forward.

    Attributes:
        tables: input prompts, placed at the virtual slots by ``prompt_index``: (P, D) one
            table for every row, or (B, P, D) a table per row; None: no input prompt.
        prefix: deep prompts: (L, 2, H_kv, P, D_head) for every row, or
            (L, 2, B, H_kv, P, D_head) per row; None: no deep prompt.
        prefix_mask: (B, P) 1 where a row uses a prefix position (rows of different
            prompt lengths, or rows without a deep prompt, in one batch); None: every row
            uses all P.
        input_delta: DePT's additive update of the input embeddings: (S_max, D) for every
            row, or (B, S_max, D) per row (zeros for rows without one); row j is added to
            the j-th real token of a row (`add_input_delta`); None: no delta.
    """

    tables: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    prefix_mask: torch.Tensor | None = None
    input_delta: torch.Tensor | None = None

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[-2])

    def full_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, P + S): the attention mask with the prefix positions in front."""
        if self.prefix is None:
            return attention_mask
        if self.prefix_mask is None:
            return prefix_mask(attention_mask, self.prefix_length)
        return torch.cat([self.prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)


def embedding_dtype(base) -> torch.dtype:
    """The dtype of `base`'s weights (its input embeddings'): prompts are cast to it."""
    return base.get_input_embeddings().weight.dtype


def embed(base, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor,
          prompts: Prompts) -> torch.Tensor:
    """(B, S, D) token embeddings with the input prompts in their virtual slots and the
    input delta added to the real tokens."""
    embeds = base.get_input_embeddings()(input_ids)
    if prompts.tables is not None:
        embeds = place_input_prompts(embeds, prompt_index, prompts.tables)
    if prompts.input_delta is not None:
        embeds = add_input_delta(embeds, attention_mask, prompt_index, prompts.input_delta)
    return embeds


def add_input_delta(embeddings: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor,
                    delta: torch.Tensor) -> torch.Tensor:
    """Add DePT's position-wise update to the real tokens of each row.

    A row's j-th real token (attended and not a virtual slot; its special tokens and
    template text count, as the paper adds the update to every token of the tokenized
    input) receives ``delta[j]``; tokens from j = S_max on receive nothing. j counts only
    the row's own real tokens, so left or right padding, the other rows of a batch and the
    place of the virtual slots in the template never move it; tokens a decoder generates
    after the row are not part of it (no delta).

    Args:
        embeddings: (B, S, D) token embeddings, virtual slots already placed.
        attention_mask, prompt_index: (B, S) the batch's rows.
        delta: (S_max, D) for every row, or (B, S_max, D) per row.

    Returns:
        (B, S, D) embeddings.
    """
    B, S, D = embeddings.shape
    real = attention_mask.bool() & (prompt_index < 0)  # (B, S)
    j = real.long().cumsum(1) - 1  # (B, S) index among the row's real tokens
    S_max = delta.shape[-2]
    covered = real & (j < S_max)
    if delta.dim() == 2:
        delta = delta.unsqueeze(0).expand(B, -1, -1)  # (B, S_max, D), a view
    index = j.clamp(0, S_max - 1).unsqueeze(-1).expand(B, S, D)  # (B, S, D)
    added = embeddings + torch.gather(delta.to(embeddings.dtype), 1, index)  # (B, S, D)
    return torch.where(covered.unsqueeze(-1), added, embeddings)


def base_inputs(base, spec: ModelSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_index: torch.Tensor, prompts: Prompts, *, keep_cache: bool = False,
                logits_to_keep: int | torch.Tensor | None = None, additive_mask: bool = False) -> dict[str, Any]:
    """The base model's keyword arguments for one forward of a causal LM or an encoder
    with `prompts`: ``base(**base_inputs(...))``.

    Args:
        input_ids, attention_mask, prompt_index: (B, S) rows, padded on either side.
        keep_cache: the forward's keys and values are kept for later steps (a decoder's
            prefill, a cached leading segment): the cache grows from the deep prefix, or
            from nothing. Otherwise (training, scoring) the deep prefix goes in read-only.
        logits_to_keep: the columns the LM head is applied at (an int: the last ones; a
            (K,) tensor: those), for a base that takes ``logits_to_keep``; None: all. The
            base is given the last ones as an index tensor (`last_columns`).
        additive_mask: give the causal LM its (B, 1, S, P + S) additive causal mask
            (`causal_additive_mask`) instead of the 2-D one (a forward captured as a CUDA
            graph: transformers builds a 4-D mask from a 2-D one by reading its values on
            the host, which a capture forbids; a 4-D mask it takes as it is).

    Returns:
        ``inputs_embeds`` (B, S, D) with the input prompts placed; ``attention_mask``
        (B, P + S) with the prefix in front (or its 4-D form, `additive_mask`); ``position_ids`` (B, S) counting only attended
        positions, for families that take them; the Cache under `CACHE_ARG`, pre-filled
        with the deep prefix (none for a forward without prefix that keeps nothing);
        ``use_cache``, ``return_dict`` and ``logits_to_keep`` where given.
    """
    full_mask = prompts.full_mask(attention_mask)
    inputs: dict[str, Any] = dict(inputs_embeds=embed(base, input_ids, attention_mask, prompt_index, prompts),
                                  attention_mask=full_mask, use_cache=keep_cache, return_dict=True)
    cache = _base_cache(base, spec, prompts, input_ids.shape[0], keep_cache)
    if cache is not None:
        inputs[CACHE_ARG] = cache
    if spec.accepts_position_ids:
        inputs["position_ids"] = position_ids(full_mask, spec)[:, prompts.prefix_length :]
    if logits_to_keep is not None:
        inputs["logits_to_keep"] = last_columns(logits_to_keep, input_ids.shape[1], input_ids.device)
    if additive_mask:
        inputs["attention_mask"] = causal_additive_mask(full_mask, input_ids.shape[1], inputs["inputs_embeds"].dtype)
    return inputs


def causal_additive_mask(full_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, S, K) additive mask of a causal forward whose S queries are the last S of
    K = P + S columns: 0 where query q may attend column k (an attended column at or before
    its own), the dtype's minimum elsewhere. A padding query attends to itself alone, so
    no row of scores is all masked (its output is never read).

    Args:
        full_mask: (B, K) 1 where a column is attended (`Prompts.full_mask`).
    """
    K = full_mask.shape[1]
    own = torch.arange(K - query_length, K, device=full_mask.device)[:, None]  # (S, 1) each query's column
    column = torch.arange(K, device=full_mask.device)[None, :]  # (1, K)
    allowed = ((column <= own)[None] & full_mask.bool()[:, None, :]) | (column == own)[None]  # (B, S, K)
    zero = torch.zeros((), dtype=dtype, device=full_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def last_columns(logits_to_keep: int | torch.Tensor, length: int, device: torch.device) -> int | torch.Tensor:
    """``logits_to_keep`` for rows of `length` columns, the last K of them given as a (K,)
    index: transformers slices ``hidden[:, -K:]`` for an int, a view whose rows lie a whole
    sequence apart, and cuBLAS runs the LM head over such a view with a skinny-tile kernel:
    11.4 ms for 64 rows of 84 columns of the 1B Llama shape on an H100 (bench.probe.prefill),
    a third of the whole prefill. An index gathers a contiguous (B, K, D) first."""
    if isinstance(logits_to_keep, int) and 0 < logits_to_keep < length:
        return torch.arange(length - logits_to_keep, length, device=device)
    return logits_to_keep


def local_kv_heads(prefix: torch.Tensor, base) -> torch.Tensor:
    """This process's K/V heads of a deep prefix ((..., H_kv, P, D_head)) when the base is
    split by tensor parallelism: its attention then holds H_kv / N heads, the k/v
    projections being split column-wise in rank order (transformers' ``colwise``). The
    split goes through DTensor (replicated -> sharded by head), so that the backward
    gathers each process's gradient: every process ends with the whole prefix's gradient,
    as the single-process model has it."""
    mesh = tensor_parallel_mesh(base)
    if mesh is None:
        return prefix
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if prefix.shape[-3] % mesh.size():
        raise UnsupportedModelError(f"{prefix.shape[-3]} K/V heads cannot be split over {mesh.size()} processes")
    whole = DTensor.from_local(prefix, mesh, [Replicate()], run_check=False)
    return whole.redistribute(mesh, [Shard(prefix.dim() - 3)]).to_local()


def whole_kv_heads(local: torch.Tensor, base) -> torch.Tensor:
    """`local_kv_heads` undone: every process's K/V heads (..., H_kv / N, P, D_head) of what
    a split forward cached, gathered in rank order into (..., H_kv, P, D_head), as the
    whole base gives them (a collective: every process calls it at the same point)."""
    mesh = tensor_parallel_mesh(base)
    if mesh is None:
        return local
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, mesh, [Shard(local.dim() - 3)], run_check=False).full_tensor()


def _base_cache(base, spec: ModelSpec, prompts: Prompts, batch_size: int, keep_cache: bool) -> Cache | None:
    """The Cache of `base_inputs`: a growing one when `keep_cache`, else the read-only
    prefix of a causal LM or an encoder (None: no deep prompt). Under tensor parallelism
    the prefix holds this process's heads (`local_kv_heads`)."""
    dtype = embedding_dtype(base)
    if prompts.prefix is not None:
        prompts = dataclasses.replace(prompts, prefix=local_kv_heads(prompts.prefix, base))
    if keep_cache:
        if prompts.prefix is None:
            return DynamicCache(config=base.config)
        return decoder_prefix_cache(prompts.prefix, spec, base.config, batch_size, dtype)
    if prompts.prefix is None:
        return None
    if spec.kind is ModelKind.CAUSAL:
        return forward_prefix_cache(prompts.prefix, spec, base.config, batch_size, dtype)
    return encoder_prefix_cache(prompts.prefix, spec, batch_size, dtype)


def place_input_prompts(
    embeddings: torch.Tensor, prompt_index: torch.Tensor, prompts: torch.Tensor
) -> torch.Tensor:
    """Put prompt rows into the virtual slots of a batch of token embeddings.

    Args:
        embeddings: (B, S, D) token embeddings of the row (virtual slots hold a pad id's).
        prompt_index: (B, S) row of the prompt table at each virtual slot, -1 elsewhere.
        prompts: (P, D) one table for every row, or (B, P, D) a table per row.

    Returns:
        (B, S, D) embeddings with the virtual slots replaced.
    """
    B, S, D = embeddings.shape
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(B, -1, -1)  # (B, P, D), a view
    index = prompt_index.clamp(min=0).unsqueeze(-1).expand(B, S, D)  # (B, S, D)
    gathered = torch.gather(prompts.to(embeddings.dtype), 1, index)  # (B, S, D)
    return torch.where((prompt_index >= 0).unsqueeze(-1), gathered, embeddings)


def position_ids(attention_mask: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(B, K) position of every attended token among its row's attended tokens; pads get 0.

    `attention_mask` covers everything that takes a position: a deep prefix, virtual
    slots and real tokens.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0) * attention_mask.long() + spec.position_offset


def prefix_mask(attention_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """(B, P + S): the attention mask with P leading ones for a deep prefix."""
    ones = attention_mask.new_ones(attention_mask.shape[0], num_virtual_tokens)
    return torch.cat([ones, attention_mask], dim=1)


def _prefix_layers(prefix: torch.Tensor, batch_size: int,
                   dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (B, H_kv, P, D_head) keys and values of a deep prefix.

    prefix: (L, 2, H_kv, P, D_head) shared (expanded to B rows as views), or
    (L, 2, B, H_kv, P, D_head) per row.
    """
    prefix = prefix.to(dtype)  # one cast for every layer; the layers' tensors are views
    for layer in range(prefix.shape[0]):
        keys, values = prefix[layer, 0], prefix[layer, 1]
        if keys.dim() == 3:
            keys = keys.unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, H_kv, P, D_head), a view
            values = values.unsqueeze(0).expand(batch_size, -1, -1, -1)
        yield keys, values


def _fill(cache: DynamicCache, prefix: torch.Tensor, batch_size: int, dtype: torch.dtype) -> DynamicCache:
    for layer, (keys, values) in enumerate(_prefix_layers(prefix, batch_size, dtype)):
        cache.update(keys, values, layer)
    return cache


def decoder_prefix_cache(
    prefix: torch.Tensor, spec: ModelSpec, config, batch_size: int, dtype: torch.dtype
) -> DynamicCache | EncoderDecoderCache:
    """The Cache a decoder starts from: its layers' part of the deep prefix.

    Args:
        prefix: (L, 2, H_kv, P, D_head) or (L, 2, B, H_kv, P, D_head); for an
            encoder-decoder, layers ``num_layers:`` are the decoder's.

    Returns:
        A `DynamicCache` (causal LM) or an `EncoderDecoderCache` whose self-attention part
        holds the prefix and whose cross-attention part is empty.
    """
    if spec.num_decoder_layers:
        self_cache = _fill(DynamicCache(), prefix[spec.num_layers :], batch_size, dtype)
        return EncoderDecoderCache(self_cache, DynamicCache())
    return _fill(DynamicCache(config=config), prefix, batch_size, dtype)


def encoder_prefix_cache(prefix: torch.Tensor, spec: ModelSpec, batch_size: int, dtype: torch.dtype) -> "PrefixCache":
    """A read-only Cache holding the encoder layers' part of the deep prefix."""
    return PrefixCache.of(prefix[: spec.num_layers], batch_size, dtype)


class PrefixLayer(DynamicLayer):
    """One layer's deep prefix, read-only: `update` returns the prefix followed by the
    call's keys and values without storing them. A forward can then run twice on the same
    cache: activation checkpointing recomputes each layer during the backward pass, and a
    cache that appended would hand the recomputation P + 2S keys."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # (B, H_kv, P, D_head)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(Cache):
    """The Cache of a forward without generation (training, scoring): `PrefixLayer`s."""

    def __init__(self, layers: list[PrefixLayer]):
        super().__init__(layers=layers)

    @classmethod
    def of(cls, prefix: torch.Tensor, batch_size: int, dtype: torch.dtype) -> "PrefixCache":
        """prefix: (L, 2, H_kv, P, D_head) shared, or (L, 2, B, H_kv, P, D_head) per row."""
        return cls([PrefixLayer(keys, values) for keys, values in _prefix_layers(prefix, batch_size, dtype)])


class _NeverRecorded(dict):
    """An `EncoderDecoderCache.is_updated` that records nothing: every call computes its
    cross-attention keys and values, so a recomputed (checkpointed) block saves the same
    tensors as its first run."""

    def __setitem__(self, key, value) -> None:
        pass


def forward_decoder_cache(prefix: torch.Tensor, spec: ModelSpec, batch_size: int,
                          dtype: torch.dtype) -> EncoderDecoderCache:
    """The decoder cache of an encoder-decoder's forward without generation: the read-only
    prefix for self-attention, and a cross-attention part that stores nothing."""
    empty = torch.tensor([], dtype=dtype, device=prefix.device)  # cat() skips it; its length is 0
    cross = PrefixCache([PrefixLayer(empty, empty) for _ in range(spec.num_decoder_layers)])
    cache = EncoderDecoderCache(PrefixCache.of(prefix[spec.num_layers:], batch_size, dtype), cross)
    cache.is_updated = _NeverRecorded()
    return cache


def forward_prefix_cache(prefix: torch.Tensor, spec: ModelSpec, config, batch_size: int,
                         dtype: torch.dtype) -> Cache:
    """The Cache of a causal LM's forward without generation: read-only `PrefixCache`,
    unless the family has sliding-window layers (their cache layers trim what they keep:
    the generation cache of `decoder_prefix_cache` is used as it is)."""
    if spec.sliding_window_layers:
        return decoder_prefix_cache(prefix, spec, config, batch_size, dtype)
    return PrefixCache.of(prefix, batch_size, dtype)


@contextmanager
def encoder_prefix_hooks(encoder: nn.Module, spec: ModelSpec, cache: DynamicCache) -> Iterator[None]:
    """Hand `cache` to each encoder self-attention whose stack would drop it.

    T5 and BART encoders accept a cache (`CACHE_ARG`) in their attention modules but their
    stacks never pass one; a forward pre-hook supplies it for the duration of the block.
    """
    locate = spec.encoder_self_attention
    if locate is None:
        raise UnsupportedModelError(
            f"{spec.model_type}: deep prompts need the encoder's self-attention modules, "
            "and softprompt does not know where this family keeps them"
        )
    modules = locate(encoder)

    def give_cache(module, args, kwargs):
        kwargs[CACHE_ARG] = cache
        return args, kwargs

    handles = [m.register_forward_pre_hook(give_cache, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def real_token_index(prompt_index: torch.Tensor, fewest_virtual: int | None = None) -> torch.Tensor:
    """(B, T) positions of the non-virtual tokens of each row, in order.

    T = S - min over rows of the row's virtual tokens (`fewest_virtual`, when the caller
    read it already; reading it waits for the device); a row with more virtual tokens is
    padded at the end with its last position (its extra entries are masked by the
    caller). Stable sort keeps real tokens and pads in their order.
    """
    virtual = (prompt_index >= 0).long()  # (B, S)
    order = torch.sort(virtual, dim=1, stable=True).indices  # real first, then virtual
    if fewest_virtual is None:
        fewest_virtual = int(virtual.sum(1).min())
    return order[:, : prompt_index.shape[1] - fewest_virtual]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, S, ...) -> (B, T, ...) at `index` (B, T)."""
    shape = index.shape + x.shape[2:]
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return torch.gather(x, 1, expanded)
