"""Host-to-device copies that do not wait for the device.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory synchronises the
stream: it waits for every kernel already queued. The training loop builds the next
batch while the device still runs the current step's backward, so such a copy would put
the whole step back on the critical path. Copies from pinned (page-locked) memory with
``non_blocking=True`` are queued like kernels instead; PyTorch's caching host allocator
keeps the pinned buffer alive until the copy has run, and the batch's host tensors are
never written after they are built, so the asynchronous copy is safe.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a CUDA device is copied without a wait."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, queued like a kernel (valid once the stream
    has passed it: record an event after it and wait for that before reading)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def tensor_on(data, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``torch.tensor(data, device=device)`` without waiting for the device."""
    return to_device(torch.tensor(data, dtype=dtype), device)
