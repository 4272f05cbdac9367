"""The decoder's prefill (rows joining the running batch) on a GPU: where a join's time
goes, eager against compiled, and how far it is from the hardware.

    python -m bench.probe.prefill --shape llama-1b --out bench/results/prefill_h100.json

For each join (R rows of T input tokens, each with its task's prompt: input prompt tuning
with its 20 virtual tokens cached as a K/V segment, as in S1, or P-tuning v2's deep prefix
of 20 positions) and each variant (``eager``: the prefill as transformers runs it;
``compile``: `torch.compile` with dynamic shapes, unpadded; ``graphs``: the decoder's
default on a GPU, the join padded to a bucket and replayed from a CUDA graph
(`serve/graphed.py`), joins beyond its token budget eager; ``graphs+compile``:
`Decoder(compile=True)`'s, the compiled forward recorded in the graphs):

  build_ms     the host's part: collating the encoded rows, the prompts, `base_inputs`
  prefill_ms   `Decoder._prefill`: build, the base model's forward, first tokens (synced)
  join_ms      `Decoder._join`: the prefill and placing the rows' keys and values in the slots
  compile_s    the first prefill of that shape (compile variant: the compile it waits for;
               graphs: the capture)
  profile      the prefill's kernels under the CUDA profiler, grouped
  bound_ms     the larger of its FLOPs at the GPU's dense bf16 peak (2 x non-embedding
               parameters per token, attention's 4 x layers x width per attended pair, the
               LM head at the last token) and its weight bytes at the memory bandwidth

Correctness: the compiled and graphed prefills' first tokens against the eager one's (N/N:
bf16 kernels that fuse differently, or run on padded shapes, round differently).

Also reported once: `encode_ms`, tokenizing the R texts through their templates (the
engine does it when it checks a request, before the row reaches the decoder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.harness.hardware import bandwidth, forward_flops, peak_tflops
from bench.harness.kernels import kernel_table
from bench.harness.report import RESULTS, write_json
from bench.harness.shapes import SHAPES
from bench.harness.timing import measure, sync
from bench.serve.throughput import served_bank, text_of


def rows_of(bank, kind: str, rows: int, tasks: int, tokens: int):
    """R decode rows of `kind` ("input": tasks t0.., "deep": d0..), encoded as the engine
    encodes them, and the seconds that encoding took."""
    from softprompt.serve.decode import DecodeRow, Sampling

    names = [("d" if kind == "deep" else "t") + str(i % tasks) for i in range(rows)]
    entries = bank.entries(names)
    start = time.perf_counter()
    encoded = [e.model.encoder.encode({"text": text_of(tokens)}) for e in entries]
    seconds = time.perf_counter() - start

    def make():
        return [DecodeRow(n, {"text": text_of(tokens)}, Sampling(max_new_tokens=64), encoded=x, entry=e)
                for n, e, x in zip(names, entries, encoded)]

    return make, seconds


def bound(base, rows: int, tokens: int, prefix: int) -> dict:
    """The join's FLOPs at the dense bf16 peak and its weight bytes at the bandwidth (ms)."""
    flops = forward_flops(base, rows, tokens, prefix)
    weight_bytes = sum(p.numel() for p in base.parameters()) * base.get_input_embeddings().weight.element_size()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    peak = peak_tflops(name) or float("nan")
    flop_ms = 1e3 * flops / (peak * 1e12)
    byte_ms = 1e3 * weight_bytes / bandwidth() if torch.cuda.is_available() else float("nan")
    return {"tflops": flops / 1e12, "flops_ms": flop_ms, "weights_ms": byte_ms, "bound_ms": max(flop_ms, byte_ms)}


def probe(decoder, make, rows: int) -> dict:
    """One join size on one decoder: its phases, its first prefill's seconds, its kernels."""
    out: dict = {}
    start = time.perf_counter()
    first = decoder._prefill(make())  # compiles, for the compiled variant
    sync()
    out["compile_s"] = round(time.perf_counter() - start, 2)

    def build():  # the host's part of `_prefill`: collate, prompts, inputs
        return decoder.prefill.inputs(make())()

    out["build_ms"] = round(1e3 * measure(build, warmup=2, calls=5, windows=3).seconds, 3)
    out["prefill_ms"] = round(1e3 * measure(lambda: decoder._prefill(make()), warmup=2, calls=5, windows=3).seconds, 3)

    def join():
        decoder._join(make())
        decoder._rows = [None] * len(decoder._rows)
        decoder.slots.reset()

    out["join_ms"] = round(1e3 * measure(join, warmup=2, calls=5, windows=3).seconds, 3)
    if torch.cuda.is_available():
        out["profile"] = kernel_table(lambda: decoder._prefill(make()), 3)
    return out, first


def main() -> None:
    from softprompt.serve.decode import Decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--joins", nargs="+", default=["input:1x64", "input:4x64", "input:16x64", "input:64x64",
                                                       "input:64x256", "deep:1x64", "deep:64x64"],
                        help="kind:RxT, kind input (cached 20-token prompt) or deep (P-tuning v2, 20 positions)")
    parser.add_argument("--variants", nargs="+", default=["eager", "graphs", "compile", "graphs+compile"],
                        choices=["eager", "graphs", "compile", "graphs+compile"])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "prefill.json"))
    args = parser.parse_args()
    device, bank, report = served_bank(args.shape, args.tasks, "prefill", "bench.probe.prefill", sys.argv[1:], vars(args))
    joins = []
    for spec in args.joins:
        kind, _, size = spec.partition(":")
        rows, tokens = (int(x) for x in size.split("x"))
        joins.append((kind, rows, tokens))
    firsts: dict = {}
    for variant in args.variants:
        decoder = Decoder(bank, max_rows=max(r for _, r, _ in joins), graphs=True, compile="compile" in variant,
                          padded_prefill="graphs" in variant)
        for kind, rows, tokens in joins:
            make, encode_s = rows_of(bank, kind, rows, args.tasks, tokens)
            row = {"variant": variant, "kind": kind, "rows": rows, "input_tokens": tokens,
                   "encode_ms": round(encode_s * 1e3, 3), "bound": bound(bank.base, rows, tokens, 20)}
            try:
                measured, first = probe(decoder, make, rows)
                row.update(measured)
                firsts.setdefault((kind, rows, tokens), {})[variant] = first[0].tolist()
                reference = firsts[(kind, rows, tokens)].get("eager")
                if variant != "eager" and reference is not None:
                    same = sum(a == b for a, b in zip(first[0].tolist(), reference))
                    row["first_tokens_equal_eager"] = f"{same}/{rows}"
                graphs = decoder.prefill.graphs
                if graphs is not None:  # how many graphs so far; False: a capture failed, joins run eagerly
                    row["prefill_graphs"] = len(graphs) if graphs.enabled else False
                if device == "cuda":
                    row["share_of_bound"] = row["bound"]["bound_ms"] / row["prefill_ms"]
            except Exception as e:  # a failing join is reported, not fatal
                import traceback

                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
            report["results"].append(row)
            print({k: row.get(k) for k in ("variant", "kind", "rows", "input_tokens", "compile_s", "build_ms",
                                           "prefill_ms", "join_ms", "share_of_bound", "first_tokens_equal_eager",
                                           "error")}, flush=True)
            write_json(report, Path(args.out))
        del decoder


if __name__ == "__main__":
    main()
