"""Which scaled-dot-product-attention kernels a training forward may use.

PyTorch's cuDNN attention backend (its default on H100 / H200 since torch 2.11) returns NaN
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

TRAINING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_backends(device: torch.device) -> list[SDPBackend] | None:
    """The SDPA backends a forward on `device` may use now: all (None) unless it will be
    differentiated on a CUDA device."""
    return TRAINING_BACKENDS if device.type == "cuda" and torch.is_grad_enabled() else None


def attention_for(device: torch.device) -> ContextManager:
    """The context a base model's forward runs in (see the module docstring)."""
    backends = training_backends(device)
    return sdpa_kernel(backends) if backends is not None else nullcontext()
