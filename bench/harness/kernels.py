"""GPU kernels under the CUDA profiler, grouped by what they do (matrix products,
attention, fused Triton kernels, elementwise glue, copies, reductions): the profile
tables of the engine's probes."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch


def kernel_table(step: Callable[[], Any], steps: int) -> dict:
    """Kernels of `steps` calls of `step` under the CUDA profiler: per call, grouped by
    `group_of`, and the top 15 by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.device_time)
    groups: dict[str, float] = defaultdict(float)
    for name, times in by_name.items():
        groups[group_of(name)] += sum(times) / steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {"gpu_us_per_step": round(sum(groups.values()), 1),
            "kernels_per_step": round(sum(len(t) for t in by_name.values()) / steps, 1),
            "groups_us": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:120], "calls_per_step": round(len(t) / steps, 2), "us_per_step": round(sum(t) / steps, 1)}
                    for n, t in top]}


def group_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "gemv", "splitk")):
        return "matrix products"
    if any(k in n for k in ("fmha", "flash", "attention", "cudnn", "attn")):
        return "attention"
    if n.startswith("triton"):
        return "fused (triton)"
    if "copy" in n or "elementwise_kernel" in n and "direct_copy" in n:
        return "copies"
    if "reduce" in n or "argmax" in n:
        return "reductions"
    if "elementwise" in n:
        return "elementwise"
    return "other"
