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
