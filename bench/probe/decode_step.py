"""One decode step of the serving engine on a GPU, where its time goes, and how far it is
from the hardware: the step over R occupied slots (rows of 16 tasks' input prompts joined
with 84-token prompts), replayed as a CUDA graph, for each variant of the step:

  transformers   the model's own SDPA attention (grouped K/V heads repeated per step)
  slot           `attention.slot_attention` (one-token queries packed per K/V head, no copy)
  slot+compile   the same, the step's forward compiled with `torch.compile` before capture
  slot+compile+siblings   compiled with the weights frozen as constants and each layer's
                 Q/K/V and gate/up products run as one product each (`serve/sibling_products.py`)
  slot+regional+copies   the base's blocks compiled, not the whole step (``compile={"regional":
                 True}``, `serve.compiled.regional_call`), then captured: the compile time against
                 the whole step's (capture_s), and the step's time
  slot+compile+sdpa   compiled, the packed attention left on SDPA (cuDNN) instead of
                 `attention.packed_products` (what the compiled step ran before)
  ...+copies     each row's cached prompt segment copied into its own slot columns, as
                 before the prefix pool (`serve/prefix_pool.py`: each task's segment
                 stored once, read beside the rows' columns); the other variants use the pool

(An earlier ``slot+compile+freezing`` row passed ``{"options": {"freezing": True}}`` to
`torch.compile`; that never froze the weights, since dynamo reads inductor's freezing flag
when it traces, so it measured the plain compiled step. Inductor's GEMM autotuning, ``{"mode": "max-autotune-no-cudagraphs"}``, was measured too:
3.86 ms at 256 rows on an H100 against cuBLAS's 3.29, after 190 s of autotuning.)

    python -m bench.probe.decode_step --shape llama-1b --out bench/results/decode_step.json

For each variant and row count: the step's milliseconds (median of windows of replays), its
kernels under the CUDA profiler (per step: calls and microseconds, grouped), the steady
decode rate R / step, and the bound: the bytes one step must read (every weight once, plus
the K/V columns the step's attention reads) at the GPU's memory bandwidth. Correctness: the
greedy tokens of 24 replayed steps equal those of the same variant's eager step, row by row
(N/N), and are compared with the transformers variant's (rows equal, not asserted: other
kernels may round differently in bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from bench.harness.hardware import bandwidth
from bench.harness.kernels import kernel_table
from bench.harness.report import RESULTS, versions, write_json
from bench.harness.shapes import SHAPES, build_base, tokenizer
from bench.harness.timing import measure, sync

VARIANTS = {"transformers": (False, False), "slot": (True, False), "slot+compile": (True, True),
            "slot+compile+siblings": (True, True), "slot+compile+sdpa": (True, True), "slot+copies": (True, False),
            "slot+compile+copies": (True, True), "slot+compile+copies+siblings": (True, True),
            "slot+regional+copies": (True, {"regional": True})}
def bank_of(base, tok, tasks: int, virtual: int):
    import softprompt as sp
    from softprompt.serve import PromptBank

    bank = PromptBank(base, tok, cache_prompts=True)
    for t in range(tasks):
        torch.manual_seed(t)
        bank.add(f"t{t}", sp.SoftPromptModel(base, sp.PromptTuningConfig(template=f"[P:{virtual}] {{text}}",
                                                                          init="random"), tokenizer=tok))
    return bank


@contextlib.contextmanager
def variant(base, name: str):
    """The step with or without the slot attention (without: the model's own SDPA, as before)."""
    from softprompt import attention
    from softprompt.serve import slots

    if name.endswith("+sdpa"):
        kept_products = attention.packed_products
        attention.packed_products = lambda q, k, v, mask, scale: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale)
        try:
            yield
        finally:
            attention.packed_products = kept_products
        return
    if VARIANTS[name][0]:
        yield
        return
    kept = slots.use_slot_attention
    slots.use_slot_attention = lambda model: False
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        slots.use_slot_attention = kept


def joined(bank, rows: int, tasks: int, text: str, *, graphs: bool, compile: bool, columns: int, name: str):
    """A decoder whose R slots all hold a row (joined in one prefill), ready to step."""
    from softprompt.serve.decode import Decoder, DecodeRow, Sampling

    shared = name != "transformers" and "+copies" not in name
    decoder = Decoder(bank, max_rows=rows, graphs=graphs, compile=compile, columns=columns, shared_prefix=shared,
                      sibling_products=compile is not False and "+siblings" in name)
    decoder._join([DecodeRow(f"t{i % tasks}", {"text": text}, Sampling(max_new_tokens=64)) for i in range(rows)])
    return decoder


def tokens_of(slots, steps: int, first_logits: list | None = None) -> list[list[int]]:
    """Each row's greedy tokens of `steps` steps (the first step's (R, V) scores appended
    to `first_logits` if given)."""
    out = []
    for i in range(steps):
        slots.step()
        out.append(slots.greedy.clone())
        if i == 0 and first_logits is not None:
            first_logits.append(slots.logits.float().clone())
    return torch.stack(out, 1).tolist()


def agreement(a: list, b: list, logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict:
    """Rows whose tokens agree, rows whose first token does, and the first step's largest
    score difference (a kernel's rounding moves scores by ~1e-2 in bf16; a wrong column by
    whole units)."""
    return {"rows_equal": f"{sum(x == y for x, y in zip(a, b))}/{len(a)}",
            "first_token_equal": f"{sum(x[0] == y[0] for x, y in zip(a, b))}/{len(a)}",
            "first_step_max_score_diff": round(float((logits_a - logits_b).abs().max()), 4)}


def whole_run(decoder, rows: int, tasks: int, text: str, step_ms: float, new: int = 32) -> dict:
    """S1's run on the kept slots: R rows joining at once, `new` greedy tokens each (the
    prefill, the steps and the host loop between them), and the prefill alone."""
    from softprompt.serve.decode import DecodeRow, Sampling

    def make():
        return [DecodeRow(f"t{i % tasks}", {"text": text}, Sampling(max_new_tokens=new)) for i in range(rows)]

    decoder._rows = [None] * rows
    decoder.slots.reset()
    seconds = measure(lambda: decoder.run(make()), warmup=1, calls=3).seconds
    prefill = measure(lambda: decoder._prefill(make()), warmup=1, calls=3).seconds
    steps = new - 1  # the first token comes from the prefill
    return {"seconds": round(seconds, 5), "new_tokens_per_s": rows * new / seconds, "prefill_ms": round(prefill * 1e3, 3),
            "host_and_joins_ms": round((seconds - prefill) * 1e3 - steps * step_ms, 3), "steps": steps}


def bound_ms(base, slots) -> dict:
    """The step's bytes at the memory bandwidth: every weight once, and the K/V columns read."""
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in slots.kv)
    if slots.pool is not None:  # the pool's columns in use, read once
        kv += sum(k[:, : slots.pool.top].numel() * k.element_size() * 2 for k in slots.pool.keys)
    bw = bandwidth() if torch.cuda.is_available() else float("nan")
    return {"weight_bytes": weights, "kv_bytes_read": kv, "weights_ms": 1e3 * weights / bw,
            "weights_and_kv_ms": 1e3 * (weights + kv) / bw, "bandwidth_bytes_per_s": bw}


def probe(base, tok, args, name: str, rows: int, reference: dict) -> dict:
    compile = VARIANTS[name][1]
    bank = args.bank
    text = " hello" * args.input_tokens
    out: dict = {"variant": name, "rows": rows}
    with variant(base, name):
        start = time.perf_counter()
        decoder = joined(bank, rows, args.tasks, text, graphs=True, compile=compile, columns=args.columns, name=name)
        slots = decoder.slots
        slots.step()  # capture (and compile)
        sync()
        out["capture_s"] = round(time.perf_counter() - start, 2)
        out["cuda_graph"] = slots._graph is not None
        out["columns"] = slots.columns
        graph_logits: list = []
        graph_tokens = tokens_of(slots, args.check_steps, graph_logits)
        timing = measure(slots.step, warmup=3, calls=args.calls, windows=3)
        out["step_ms"] = round(timing.seconds * 1e3, 3)
        out["windows_ms"] = [round(w * 1e3, 3) for w in timing.windows]
        if torch.cuda.is_available():
            out["profile"] = kernel_table(slots.step, 10)
        out["bound"] = bound_ms(base, slots)
        out["run"] = whole_run(decoder, rows, args.tasks, text, out["step_ms"])
        decoder.slots = None
        eager = joined(bank, rows, args.tasks, text, graphs=False, compile=False, columns=args.columns, name=name)
        eager.slots.step()
        eager_logits: list = []
        eager_tokens = tokens_of(eager.slots, args.check_steps, eager_logits)
        out["eager_step_ms"] = round(measure(eager.slots.step, warmup=1, calls=5, windows=1).seconds * 1e3, 3)
        eager.slots = None
        if compile:  # where a difference comes from: the compiler, or the graph of compiled code
            alone = joined(bank, rows, args.tasks, text, graphs=True, compile=compile, columns=args.columns, name=name)
            alone.slots.graphs = False  # the compiled forward stepped without a graph
            alone.slots.step()
            alone_logits: list = []
            alone_tokens = tokens_of(alone.slots, args.check_steps, alone_logits)
            alone.slots = None
            out["compiled_no_graph_vs_eager"] = agreement(alone_tokens, eager_tokens, alone_logits[0], eager_logits[0])
            out["graph_vs_compiled_no_graph"] = agreement(graph_tokens, alone_tokens, graph_logits[0], alone_logits[0])
    out["graph_rows_equal_eager"] = f"{sum(a == b for a, b in zip(graph_tokens, eager_tokens))}/{rows}"
    out["graph_vs_eager"] = agreement(graph_tokens, eager_tokens, graph_logits[0], eager_logits[0])
    reference[(name, rows)] = graph_tokens
    pooled = reference.get((name.removesuffix("+copies"), rows)) if name.endswith("+copies") else None
    if pooled is not None:  # the same step with the prefix pool (bf16: one softmax over two parts rounds apart)
        out["rows_equal_pool_variant"] = f"{sum(a == b for a, b in zip(graph_tokens, pooled))}/{rows}"
    plain = reference.get((name.replace("+siblings", ""), rows)) if "+siblings" in name else None
    if plain is not None:  # the same compiled step with separate products (bf16: other kernels may round apart)
        out["rows_equal_without_siblings"] = f"{sum(a == b for a, b in zip(graph_tokens, plain))}/{rows}"
    if name == "transformers":
        reference[rows] = graph_tokens
    elif rows in reference:
        out["rows_equal_transformers_variant"] = f"{sum(a == b for a, b in zip(graph_tokens, reference[rows]))}/{rows}"
    out["new_tokens_per_s_steady"] = rows / (timing.seconds)
    out["share_of_weights_bound"] = out["bound"]["weights_ms"] / out["step_ms"]
    out["share_of_weights_and_kv_bound"] = out["bound"]["weights_and_kv_ms"] / out["step_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--virtual", type=int, default=20)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--columns", type=int, default=192, help="slot columns (84 used at the join, + the steps)")
    parser.add_argument("--check-steps", type=int, default=24)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "decode_step.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run (no graphs, no profile)
    base = build_base(args.shape, device)
    tok = tokenizer()
    args.bank = bank_of(base, tok, args.tasks, args.virtual)
    report = {"benchmark": "decode step", "shape": args.shape, "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
              "versions": versions(), "command": f"python -m bench.probe.decode_step --shape {args.shape}",
              "settings": {k: v for k, v in vars(args).items() if k not in ("bank", "out")}, "results": []}
    reference: dict = {}
    for name in args.variants:
        for rows in args.rows:
            try:
                row = probe(base, tok, args, name, rows, reference)
            except Exception as e:  # a failing variant is reported, not fatal
                import traceback

                traceback.print_exc()
                row = {"variant": name, "rows": rows, "error": f"{type(e).__name__}: {e}"}
            report["results"].append(row)
            print({k: row.get(k) for k in ("variant", "rows", "step_ms", "capture_s", "run", "graph_rows_equal_eager",
                                           "rows_equal_transformers_variant", "rows_equal_pool_variant", "graph_vs_eager", "compiled_no_graph_vs_eager",
                                           "graph_vs_compiled_no_graph", "share_of_weights_bound", "error")},
                  flush=True)
            write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
