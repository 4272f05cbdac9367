"""What a GPU can do at most, as sold: the bounds every speed figure is set against."""

from __future__ import annotations

import torch

#: bytes/s of device memory (HBM3 / HBM3e)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
#: dense bf16 TFLOP/s without sparsity
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def bandwidth(name: str | None = None) -> float:
    """Memory bandwidth of the GPU `name` (default: device 0) in bytes/s; an unknown card
    is taken as an H100."""
    name = torch.cuda.get_device_name(0) if name is None else name
    return next((b for k, b in BANDWIDTH.items() if k in name), BANDWIDTH["H100"])


def peak_tflops(name: str) -> float | None:
    """Dense bf16 TFLOP/s of the GPU `name` (None: not known)."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def forward_flops(base, rows: int, tokens: int, prefix: int = 0, lm_head_columns: int = 1) -> float:
    """FLOPs of a causal forward over `rows` rows of `tokens` tokens after a cached `prefix`:
    2 x non-embedding parameters per token, attention's 4 x layers x width per attended
    pair (causal: each token sees those before it and the prefix), the LM head at
    `lm_head_columns` columns of each row (its parameters are the embedding's shape)."""
    config = base.config
    embedding = base.get_input_embeddings().weight.numel()
    head = base.get_output_embeddings()
    untied = head is not None and head.weight.data_ptr() != base.get_input_embeddings().weight.data_ptr()
    body = sum(p.numel() for p in base.parameters()) - embedding - (head.weight.numel() if untied else 0)
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    pairs = rows * (tokens * (tokens + 1) / 2 + tokens * prefix)
    return 2 * body * rows * tokens + 4 * config.num_hidden_layers * width * pairs + 2 * embedding * rows * lm_head_columns
