"""GPU kernels under the CUDA profiler, grouped by what they do (matrix products,
attention, fused Triton kernels, elementwise glue, copies, reductions): the profile
tables of the engine's probes and of the training step's (`bench.probe.profile_train_step`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch


#: name parts of an attention kernel: SDPA's flash, memory-efficient (fmha) and cuDNN kernels,
#: flex attention's Triton kernels (inductor names them after the flex_attention operator)
#: and the softmax of attention run as matrix products (SDPA's math path, eager attention)
ATTENTION = ("flash", "attention", "attn", "fmha", "sdpa", "flex", "cudnn", "softmax")


def kernel_table(step: Callable[[], Any], steps: int) -> dict:
    """Kernels of `steps` calls of `step` under the CUDA profiler: per call, grouped by
    `group_of`, and the top 15 by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_name = kernel_times(prof.events())
    groups: dict[str, float] = defaultdict(float)
    for name, times in by_name.items():
        groups[group_of(name)] += sum(times) / steps
    return {"gpu_us_per_step": round(sum(groups.values()), 1),
            "kernels_per_step": round(sum(len(t) for t in by_name.values()) / steps, 1),
            "groups_us": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": top_kernels(by_name, steps)}


def kernel_times(events) -> dict[str, list[float]]:
    """The device time (us) of every CUDA kernel launch among a profiler's `events`, by kernel name."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name].append(e.device_time)
    return by_name


def top_kernels(by_name: dict[str, list[float]], steps: int, most: int = 15, width: int = 120) -> list[dict]:
    """The `most` kernels of `kernel_times` by total time: name (cut to `width`), calls and us per step."""
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:most]
    return [{"kernel": n[:width], "calls_per_step": round(len(t) / steps, 2), "us_per_step": round(sum(t) / steps, 1)}
            for n, t in top]


def is_attention(name: str) -> bool:
    """Whether kernel `name` computes attention (`ATTENTION`)."""
    n = name.lower()
    # the LM loss's log-softmax over the vocabulary is no attention (cunn_SoftMaxForward<..LogSoftMax..>,
    # an inductor kernel's ..._log_softmax_...)
    return any(k in n for k in ATTENTION) and "logsoftmax" not in n.replace("_", "")


def group_of(name: str) -> str:
    n = name.lower()
    if is_attention(n):  # before the products: the memory-efficient kernels are named fmha_cutlass*
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "gemv", "splitk")):
        return "matrix products"
    if n.startswith("triton"):
        return "fused (triton)"
    if "copy" in n or "elementwise_kernel" in n and "direct_copy" in n:
        return "copies"
    if "reduce" in n or "argmax" in n:
        return "reductions"
    if "elementwise" in n:
        return "elementwise"
    return "other"
