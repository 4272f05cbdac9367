"""How long the serving engine's dynamic-shape forward takes to compile, whole or block by
block (regional: `serve.compiled`, ``compile={"regional": True}``), on this device.

A Llama of ``--layers`` layers (random init; ``--shape``'s sizes, or a narrow one on the CPU)
runs one forward of 2 x 12 tokens through `torch.compile` with dynamic shapes: the whole
forward, then a view of it whose blocks are compiled (`regions.view`); inductor's FX graph
cache is off, so each compile is cold. Also: a second shape (3 x 20 tokens, no recompile
expected) and the largest difference of the logits from the uncompiled forward.

    python -m bench.probe.compile_time --out bench/results/compile_time_cpu.json            # CPU (narrow)
    python -m bench.probe.compile_time --shape llama-1b --out bench/results/compile_time_h100.json  # GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, rerun_command, versions, write_json
from bench.harness.shapes import SHAPES


def _base(args, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.shape is None:  # narrow: what the CPU compiles in a minute
        config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2)
        dtype = torch.float32
    else:
        from bench.harness.shapes import build_base

        return build_base(args.shape, device, torch.bfloat16).requires_grad_(False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype).eval().requires_grad_(False)


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    from torch._inductor import config as inductor

    from softprompt import regions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="a real shape (default: a narrow Llama)")
    parser.add_argument("--layers", type=int, default=16, help="layers of the narrow Llama")
    parser.add_argument("--out", default=str(RESULTS / "compile_time.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = _base(args, device)
    vocab = base.config.vocab_size
    first, second = (torch.randint(0, vocab, shape, device=device) for shape in ((2, 12), (3, 20)))

    def forward(model, ids):
        return model(input_ids=ids, use_cache=False).logits

    report = {"benchmark": "compile time of a dynamic-shape forward, whole or regional",
              "command": rerun_command("bench.probe.compile_time", sys.argv[1:]), "versions": versions(),
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
              "layers": base.config.num_hidden_layers, "hidden": base.config.hidden_size, "rows": []}
    with torch.no_grad(), inductor.patch(fx_graph_cache=False):
        reference = forward(base, first)
        for name in ("whole", "regional"):
            torch._dynamo.reset()
            if name == "whole":
                compiled = torch.compile(forward, dynamic=True)
                run = lambda ids: compiled(base, ids)  # noqa: E731
            else:
                view = regions.view(base, compile=True, compile_options={"dynamic": True})
                run = lambda ids: forward(view, ids)  # noqa: E731
            seconds, out = _timed(lambda: run(first))
            again, _ = _timed(lambda: run(second))
            row = {"variant": name, "first_call_s": round(seconds, 2), "second_shape_s": round(again, 3),
                   "max_abs_diff": float((out.float() - reference.float()).abs().max())}
            report["rows"].append(row)
            print(row, flush=True)
    write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
