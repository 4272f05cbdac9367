"""Where a batch of head requests' time goes (S2: mixed-task classification through
`Engine.run`), and how batch size, the head graphs' token budget and compilation move it.

    python -m bench.probe.heads --shape llama-1b --out bench/results/heads_h100.json
    python -m bench.probe.heads --shape tiny      # a smoke run on the CPU

The requests are S2's (`bench.serve.throughput`): 512 requests over 16 tasks' input
prompts (20 virtual tokens, cached as K/V segments: the bank's default), 64-token inputs,
the answer slot's arg-max read. For each variant, in one process:

  wall_ms        one `Engine.run` of the 512 requests (median of 3 after a warm-up): each
                 batch's forward queued before the batch before is read
  one_after_another_ms   the same with each batch read before the next is launched (the
                 engine before the pipelining); answers_equal_one_after_another: N/N
  prepare_ms     the same run with the forwards left out (`_PrepareOnly`): checking,
                 tokenizing and encoding the requests on the host
  gpu_ms         the GPU's kernel time of one run (CUDA profiler), grouped by what the
                 kernels do; idle_ms = wall - prepare - gpu: the GPU waiting on the host
                 inside the batches (collation, prompts, launches, reading the answers)
  share_of_peak  the model's FLOPs for every request's 84 tokens per wall second over the
                 dense bf16 peak (as S2 reports it); gpu_share_of_peak: per GPU second

The same requests to the base without prompts (`bank.add_base`) and HF PEFT (one batch per
task group after `set_adapter`) are timed in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.harness.hardware import forward_flops, peak_tflops
from bench.harness.kernels import kernel_table
from bench.harness.report import RESULTS, rerun_command, versions, write_json
from bench.harness.shapes import SHAPES, build_base, tokenizer
from bench.harness.timing import measure, sync
from bench.serve.throughput import _answer_probe, bank_of, peft_s2, text_of
from softprompt.encode import TemplateEncoder
from softprompt.serve import Engine, Request
from softprompt.serve.request import Result
from softprompt.template import parse_template

REQUESTS, P, TOKENS = 512, 20, 64

# name -> (most rows per batch, the head graphs' token budget (None: graphs off), compiled)
VARIANTS = {
    "128 rows, graphs": (128, 16384, False),
    "64 rows, graphs": (64, 8192, False),
    "128 rows, eager": (128, None, False),
    "128 rows, compiled + graphs": (128, 16384, True),
}


class _OneAfterAnother(Engine):
    """The engine before its head batches were pipelined: each batch's answers read before
    the next batch is collated and launched (what `Engine._run_head_batches` overlaps)."""

    def _run_head_batches(self, batches, results):
        for batch in batches:
            self._guarded(batch, results, self._run_heads, "forward")


class _PrepareOnly(Engine):
    """The engine with its head forwards left out: what `run` costs on the host before
    (and around) the GPU's work."""

    def _run_head_batches(self, batches, results):
        for batch in batches:
            for r in batch:
                results[r.index] = Result(r.entry.name, output=None)


def engine_for(bank, rows: int, graph_tokens: int | None, compile: bool, kind: type = Engine) -> Engine:
    engine = kind(bank, max_batch_rows=rows, max_batch_tokens=rows * 128, compile=compile,
                    head_graphs=graph_tokens is not None and torch.cuda.is_available())
    if engine.heads.graphs is not None:
        engine.heads.graphs.max_tokens = graph_tokens
    return engine


def probe(base, bank, requests: list[Request], name: str, rows: int, graph_tokens: int | None, compile: bool) -> dict:
    engine = engine_for(bank, rows, graph_tokens, compile)
    failed = [r.error for r in engine.run(requests) if not r.ok]  # also the warm-up: graphs captured, compiled
    batches = [n for _, n in engine.batches]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(requests)} requests failed, e.g. {failed[0]}")
    wall = measure(lambda: engine.run(requests), warmup=1, calls=1, windows=3).seconds
    # the same batches read one after the other: what the pipelining gains, and that it
    # changes no answer (the batches' forwards are the same graphs or kernels)
    sequential = engine_for(bank, rows, graph_tokens, compile, _OneAfterAnother)
    sequential.heads = engine.heads  # the same compiled forward and captured graphs
    one_by_one = sequential.run(requests)
    same = sum(a.output == b.output for a, b in zip(engine.run(requests), one_by_one))
    sequential_s = measure(lambda: sequential.run(requests), warmup=1, calls=1, windows=3).seconds
    prepare = _PrepareOnly(bank, max_batch_rows=rows, max_batch_tokens=rows * 128, head_graphs=False)
    prepare_s = measure(lambda: prepare.run(requests), warmup=1, calls=1, windows=3).seconds
    row: dict = {"variant": name, "rows": rows, "graph_tokens": graph_tokens, "compiled": compile,
                 "wall_ms": 1e3 * wall, "prepare_ms": 1e3 * prepare_s, "requests_per_s": len(requests) / wall,
                 "one_after_another_ms": 1e3 * sequential_s, "answers_equal_one_after_another": f"{same}/{len(requests)}",
                 "batch_rows": batches}
    graphs = engine.heads.graphs
    row["graphed_batches"] = None if graphs is None else len(graphs)
    if torch.cuda.is_available():
        table = kernel_table(lambda: engine.run(requests), 2)
        gpu_ms = table["gpu_us_per_step"] / 1e3
        flops = forward_flops(base, len(requests), P + TOKENS)
        peak = peak_tflops(torch.cuda.get_device_name(0)) * 1e12
        row.update(gpu_ms=gpu_ms, idle_ms=1e3 * wall - 1e3 * prepare_s - gpu_ms, kernels=table,
                   share_of_peak=flops / wall / peak, gpu_share_of_peak=flops / (gpu_ms / 1e3) / peak)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "heads.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    base = build_base(args.shape, device, dtype)
    tok = tokenizer()
    bank = bank_of(base, tok, args.tasks, f"[P:{P}] {{text}} [MASK]", cache=True)
    for entry in bank.entries(bank.names()):  # what a one-token verbalizer reads: the answer slot's logits
        entry.task = _answer_probe()
    plain = bank.add_base("base")  # the base alone, reading the same answer slot: "{text} [MASK]"
    plain.model.template = parse_template("{text} [MASK]")
    plain.model.encoder = TemplateEncoder(plain.model.template, tok, plain.model.spec)
    plain.task = _answer_probe()
    text = text_of(TOKENS - 1)  # + the answer token
    requests = [Request(f"t{i % args.tasks}", text, generate=False) for i in range(REQUESTS)]
    plain = [Request("base", text, generate=False) for _ in range(REQUESTS)]
    report = {"benchmark": "head requests (S2) profile", "shape": args.shape,
              "device": torch.cuda.get_device_name(0) if cuda else "CPU", "dtype": str(dtype), "versions": versions(),
              "command": rerun_command("bench.probe.heads", sys.argv[1:]),
              "settings": {"requests": REQUESTS, "tasks": args.tasks, "virtual_tokens": P, "input_tokens": TOKENS},
              "results": []}
    out = Path(args.out)
    for name in args.variants:
        rows, graph_tokens, compile = VARIANTS[name]
        for label, reqs in ((name, requests), (f"{name}, no prompts", plain)):
            if (compile or graph_tokens is None) and reqs is plain:
                continue
            started = time.perf_counter()
            try:
                row = probe(base, bank, reqs, label, rows, graph_tokens, compile)
            except Exception as e:  # a failing variant is reported, not fatal
                import traceback

                traceback.print_exc()
                row = {"variant": label, "error": f"{type(e).__name__}: {e}"}
            row["wall_s"] = round(time.perf_counter() - started, 1)
            report["results"].append(row)
            print({k: row.get(k) for k in ("variant", "wall_ms", "one_after_another_ms", "answers_equal_one_after_another", "prepare_ms", "gpu_ms", "idle_ms", "requests_per_s",
                                           "share_of_peak", "gpu_share_of_peak", "error")}, flush=True)
            write_json(report, out)
    peft = peft_s2(base, tok, [r.task for r in requests], text, 128, repeats=3)
    report["peft"] = {"seconds": peft, "requests_per_s": REQUESTS / peft}
    print("peft", report["peft"], flush=True)
    sync()
    write_json(report, out)


if __name__ == "__main__":
    main()
