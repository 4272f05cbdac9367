"""The one timer of the speed benchmarks: warm-up calls, then the median of a few timed
windows (small models' steps vary with the host), the device synchronised around every
window, and the peak memory of the whole measurement on a GPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU): a window ends when the work does."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per call (the median window's mean), every window's, the warm-up's seconds and,
    on a GPU, the peak memory allocated and the peak reserved above what was reserved before
    (CUDA-graph replays use a private pool whose blocks do not count as allocations: the
    reserved peak bounds what the graphs hold)."""

    seconds: float
    windows: list[float]
    warmup_s: float
    peak_gib: float | None = None
    peak_reserved_gib: float | None = None

    def step_row(self) -> dict:
        """The fields a training-step row records (ms per step, rounded as in the reports)."""
        out = {"ms_per_step": round(self.seconds * 1e3, 3), "windows_ms": [round(w * 1e3, 3) for w in self.windows],
               "warmup_s": round(self.warmup_s, 2)}
        if self.peak_gib is not None:
            out["peak_gib"] = round(self.peak_gib, 3)
            out["peak_reserved_gib"] = round(self.peak_reserved_gib, 3)
        return out


def measure(fn: Callable[[], object], *, warmup: int = 1, calls: int = 1, windows: int = 1) -> Timing:
    """Time `fn`: `warmup` calls, then `windows` windows of `calls` calls each.

    ``measure(step, warmup=3, calls=10, windows=3)`` is a training step's timing;
    ``measure(run, calls=3).seconds`` the mean of three calls after one warm-up call.
    """
    cuda = torch.cuda.is_available()
    reserved_before = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reserved_before = torch.cuda.memory_reserved()
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    warm_s = time.perf_counter() - start
    spans = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        spans.append((time.perf_counter() - start) / calls)
    timing = Timing(seconds=sorted(spans)[len(spans) // 2], windows=spans, warmup_s=warm_s)
    if cuda:
        timing.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        timing.peak_reserved_gib = (torch.cuda.max_memory_reserved() - reserved_before) / 2**30
    return timing


def graph_replay_ms(step: Callable[[], object], replays: int = 50) -> float:
    """Milliseconds of one CUDA-graph replay of `step` (the kernels alone, no launch cost):
    two warm-up calls on a side stream, `step` recorded once, then the median of three
    windows of `replays` replays timed by CUDA events. The probes that time a piece of the
    decode step (attention, the weights' products) use it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kept = step()  # noqa: F841 (the graph's outputs stay alive while it replays)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[1]


def interleaved(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each run over `rounds` rounds, the runs taken in turn after one
    warm-up round (what drifts over a run, clocks or the host, falls on all alike: runs
    timed one after the other differed by up to 25% on an H100)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
