"""Throughput against the number of distinct tasks (S-LoRA's curve, to 2,000 tasks), and a
cold prompt's move from host memory to the GPU.

    python -m bench.probe.task_count --shape llama-1b --out bench/results/task_count_h100.json
    python -m bench.probe.task_count --shape tiny --tasks 1 16 --requests 64   # CPU smoke run

R requests (64 input tokens, 32 new, greedy, no end-of-sequence stop) decode through the
engine's decoder (`Decoder`, 64 slots, continuous batching, the step replayed from a CUDA
graph); request i uses task ``i % T``, so every group of 64 joining rows holds min(T, 64)
distinct tasks and, with R >= T, every task is served. Input tasks are prompt tuning (the
bank caches their 20 virtual tokens' keys and values), deep tasks P-tuning v2 (20 virtual
tokens); "none" is the base alone on the same requests. Every mix runs on the same decoder,
the mixes interleaved round by round (`interleaved`: drift falls on all alike).

Then the same with the bank's device level capped (`PromptBank(max_on_device=...)`): with
2,000 tasks cycling through 256 device places, every joining row's prompt comes over from
host memory. cold_load_ms: one task's prompt moved to the GPU (`PromptBank._device_tensor`,
synchronised), median over 50 tasks, by kind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, write_json
from bench.harness.shapes import SHAPES
from bench.harness.timing import interleaved, sync
from bench.serve.throughput import served_bank, text_of


def requests_of(bank, names: list[str], new: int):
    from softprompt.serve.decode import DecodeRow, Sampling

    example = {"text": text_of(64)}
    return [DecodeRow(n, example, Sampling(max_new_tokens=new)) for n in names]


def cold_load_ms(bank, names: list[str]) -> float:
    """Median ms to bring one task's prompt from host memory to the device."""
    device = bank.base.get_input_embeddings().weight.device
    times = []
    for name in names:
        entry = bank[name]
        entry.on_device = None
        sync()
        start = time.perf_counter()
        bank._device_tensor(entry, device)
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    from softprompt.serve.decode import Decoder
    from softprompt.serve.warmup import warm_decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 16, 256, 2000])
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-on-device", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "task_count.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    device, bank, report = served_bank(args.shape, max(args.tasks), "task count", "bench.probe.task_count",
                                       sys.argv[1:], vars(args))
    report["build_s"] = round(time.perf_counter() - started, 1)
    bank.add_base("base")
    decoder = Decoder(bank, max_rows=args.rows, graphs=device == "cuda")
    warm_decoder(decoder)
    R = args.requests
    mixes = {"none": ["base"] * R}
    for kind, letter in (("input", "t"), ("deep", "d")):
        for T in args.tasks:
            mixes[f"{kind}:{T}"] = [f"{letter}{i % T}" for i in range(R)]

    def runs_of(names: dict[str, list[str]]) -> dict:
        return {mix: (lambda names=names: decoder.run(requests_of(bank, names, args.new))) for mix, names in names.items()}

    seconds = interleaved(runs_of(mixes), args.rounds)
    rate = {mix: R * args.new / s for mix, s in seconds.items()}
    for mix, s in seconds.items():
        kind = mix.split(":")[0]
        fewest = f"{kind}:{min(args.tasks)}" if kind != "none" else "none"
        report["results"].append({"mix": mix, "device_level": "all tasks", "seconds": s, "new_tokens_per_s": rate[mix],
                                  "of_no_prompts": rate[mix] / rate["none"], "of_fewest_tasks": rate[mix] / rate[fewest]})
        print(report["results"][-1], flush=True)
    write_json(report, Path(args.out))
    most = max(args.tasks)
    report["cold_load_ms"] = {kind: cold_load_ms(bank, [f"{letter}{i}" for i in range(min(50, most))])
                              for kind, letter in (("input (cached segment)", "t"), ("deep", "d"))}
    print("cold", report["cold_load_ms"], flush=True)
    if args.max_on_device < most:
        bank.max_on_device = args.max_on_device
        capped = {m: mixes[m] for m in (f"input:{most}", f"deep:{most}")}
        seconds = interleaved(runs_of(capped), args.rounds)
        for mix, s in seconds.items():
            report["results"].append({"mix": mix, "device_level": f"max_on_device={args.max_on_device}", "seconds": s,
                                      "new_tokens_per_s": R * args.new / s, "of_all_on_device": (R * args.new / s) / rate[mix]})
            print(report["results"][-1], flush=True)
    if torch.cuda.is_available():
        report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
