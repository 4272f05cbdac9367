"""Attention kernels: which SDPA backends a training forward may use, and the attention a
decode step over the serving slots runs.

Training: PyTorch's cuDNN attention backend (its default on H100 / H200 since torch 2.11) returns NaN
gradients when a query row attends to no key and the sequence length is 64 modulo 128
(pytorch/pytorch#196678). Left-padded rows of a causal LM are such rows: a pad at the front
sees only pads. Measured on an H100 (torch 2.11, `python -m bench.probe.sdpa_nan`): a Llama
stack with left padding at length 64 or 192 gets NaN gradients on its real tokens with the
default and the cuDNN backends, none with flash / memory-efficient / math attention, and none
with right padding. A training run of SST-2 on SmolLM2-135M stopped on a NaN loss at the
first such batch (step 124). So a training forward on a GPU leaves cuDNN out; the forward
pass alone is unaffected, and evaluation, generation and serving keep every backend.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TRAINING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_backends(device: torch.device) -> list[SDPBackend] | None:
    """The SDPA backends a forward on `device` may use now: all (None) unless it will be
    differentiated on a CUDA device."""
    return TRAINING_BACKENDS if device.type == "cuda" and torch.is_grad_enabled() else None


def attention_for(device: torch.device) -> ContextManager:
    """The context a base model's forward runs in (see the module docstring)."""
    backends = training_backends(device)
    return sdpa_kernel(backends) if backends is not None else nullcontext()


# -- decoding over slots ----------------------------------------------------------------
# Decoding: a decode step has one query token per row against the row's cached columns:
# (R, H, 1, D) queries, (R, H_kv, C, D) keys and values, an additive (R, 1, 1, C) mask shared
# by all heads. transformers' SDPA path (5.17 on every step; 5.25 under torch.compile) gives
# grouped K/V heads to the kernel by `repeat_kv`, a copy of every layer's keys and values
# H / H_kv times per step: on a 1B Llama (32 query heads over 8 K/V heads) at 64 rows that
# copy was 1.26 of the step's 4.26 ms of GPU time. A one-token query needs no copy: the G =
# H / H_kv query heads of one K/V head are G query rows of one attention over that head, so
# (R, H, 1, D) is viewed as (R, H_kv, G, D) and attends to the keys and values in place.
#
# It reaches the model through transformers' attention interface (`set_attn_implementation`,
# the documented way to give a model another attention function), for every forward of the
# model from then on, in every thread: the packed path is the same attention for any
# one-token query with a mask shared by its heads, and everything else goes to SDPA as before.
# A switch around the decode step alone would not do: another thread's forward on the same
# model (a task's prompt cache computed while loading it) would run under it meanwhile.
SLOT_ATTENTION = "sdpa_packed_gqa"


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with one-token queries on grouped K/V heads packed.

    Args:
        query: (R, H, Q, D) queries; packed where Q = 1.
        key, value: (R, H_kv, C, D) keys and values (a decode step's: all C slot columns).
        attention_mask: (R, 1, 1, C) additive, 0 where a row attends, the dtype's minimum elsewhere.

    Returns the (R, Q, H, D) attention output, as every transformers attention function.
    Anything else (a longer query, a per-head or boolean mask, soft-capping, a position bias,
    dropout, ungrouped heads) is `sdpa_attention_forward`'s, unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    R, H, Q, D = query.shape
    pool = kwargs.pop("shared_prefix", None)
    if (Q != 1 or groups == 1 or dropout or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1:3] != (1, 1) or not attention_mask.is_floating_point()
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or key.shape[-1] != value.shape[-1]):
        if pool is not None:  # its rows would silently lose their prefix
            raise RuntimeError("a shared prefix pool needs one-token queries on grouped K/V heads with an additive "
                               f"(R, 1, 1, C) mask; got queries {tuple(query.shape)}, {groups} query heads per K/V head")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(R, H // groups, groups, D)  # the G query heads of a K/V head as G query rows
    if pool is not None:
        layer = module.layer_idx
        out = pooled_products(packed, key, value, attention_mask, pool.keys[layer], pool.values[layer], pool.mask,
                              scaling)
    elif torch.compiler.is_compiling():
        out = packed_products(packed, key, value, attention_mask, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                               scale=scaling)
    return out.reshape(R, 1, H, value.shape[-1]), None


def packed_products(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    scaling: float | None) -> torch.Tensor:
    """The packed attention as two batched products around a float32 softmax: what a
    compiled decode step runs (see below).

    Args:
        packed: (R, H_kv, G, D) queries; key, value: (R, H_kv, C, D); mask: (R, 1, 1, C) additive.

    Returns (R, H_kv, G, D).

    Why, measured on an H100 (`python -m bench.probe.decode_attention`, 16 layers of a 1B
    Llama's shapes, CUDA graph): compiled, the products read each K/V column once at 35-75%
    of the memory bandwidth, where SDPA's kernels (cuDNN flash; memory-efficient) run a
    64-query tile for G = 4 queries: 0.34 vs 0.42 ms at 64 rows x 192 columns, 0.80 vs
    1.38 ms at 256 x 192, 3.40 vs 4.03 ms at 256 x 1024. Uncompiled, the same products cost
    more than SDPA (three kernels and a float32 score tensor in memory), so eager steps keep SDPA.
    """
    scale = packed.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(packed, key.transpose(-1, -2)).float() * scale + mask.float()
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


def pooled_products(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    pool_keys: torch.Tensor, pool_values: torch.Tensor, pool_mask: torch.Tensor,
                    scaling: float | None) -> torch.Tensor:
    """`packed_products` over a row's slot columns and its task's prefix in the shared pool
    (`serve/prefix_pool.py`), one softmax over both: what the row computes with the prefix
    in its own columns.

    Args:
        packed: (R, H_kv, G, D) queries; key, value: (R, H_kv, C, D) slot columns; mask:
            (R, 1, 1, C) additive.
        pool_keys, pool_values: (H_kv, N, D) every task's prefix once; pool_mask: (R, N)
            additive, 0 on the row's task's span.

    Returns (R, H_kv, G, D). The pool is read once for all rows: its products run with the
    R x G query rows of a K/V head as one matrix against the pool's N columns.
    """
    R, H_kv, G, D = packed.shape
    N = pool_keys.shape[1]
    scale = D ** -0.5 if scaling is None else scaling
    queries = packed.transpose(0, 1).reshape(H_kv, R * G, D)
    pool_scores = torch.matmul(queries, pool_keys.transpose(-1, -2)).view(H_kv, R, G, N).transpose(0, 1)
    slot_scores = torch.matmul(packed, key.transpose(-1, -2))
    scores = torch.cat([pool_scores.float() * scale + pool_mask.float()[:, None, None, :],
                        slot_scores.float() * scale + mask.float()], dim=-1)
    weights = scores.softmax(-1).to(value.dtype)
    from_pool = torch.matmul(weights[..., :N].transpose(0, 1).reshape(H_kv, R * G, N), pool_values)
    from_pool = from_pool.view(H_kv, R, G, -1).transpose(0, 1)
    return (from_pool.float() + torch.matmul(weights[..., N:], value).float()).to(value.dtype)


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)  # its masks are SDPA's


def use_slot_attention(model: torch.nn.Module) -> bool:
    """Give `model` the slot attention if it runs transformers' SDPA attention on grouped
    K/V heads (other implementations and ungrouped heads are left as they are); True when
    it runs it."""
    config = model.config
    name = config._attn_implementation
    grouped = getattr(config, "num_key_value_heads", None) not in (None, getattr(config, "num_attention_heads", None))
    if name == "sdpa" and grouped and getattr(model, "_supports_attention_backend", False):
        model.set_attn_implementation(SLOT_ATTENTION)
        name = model.config._attn_implementation
    return name == SLOT_ATTENTION
