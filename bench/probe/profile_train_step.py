"""Where a training step's time goes: wall time, GPU busy time, kernel launches, host waits,
the top host-side operators and the top CUDA kernels (with attention's share of the GPU
time), for softprompt, HF PEFT and the floor (the steps of bench.train.throughput:
`bench.harness.steps`).

    python -m bench.probe.profile_train_step --model gpt2-124m --shape 8x256 --loss cls --out bench/results/train_profile.json

Rows: ``floor eager`` / ``floor compile`` (the frozen model), ``ours <method> <variant>``
and ``peft <method>``; each with its top 12 CUDA kernels (us and calls per step) and
attention's share of the GPU time (``attention_ms``, ``attention_share``: the kernels
`bench.harness.kernels.is_attention` names), empty on the CPU.

With ``--mix`` every row runs the mix's rows (`steps.MIXES`, at most S tokens each,
left-padded), the floor's eager row is named ``floor padded``, and the ``packed`` variant
adds ``floor packed`` and ``ours <method> packed``: the same rows padding-free in sequences
of at most ``--pack-tokens`` tokens (train.packing, `softprompt.packing`), through the
steps bench.train.throughput times. ``--attention`` is the base's attn_implementation:
under ``sdpa`` a packed sequence carries a 4-D mask (the masked kernels over every pair of
a sequence); under ``flex_attention`` a `BlockMask` (blocks no segment reads are skipped).
Issue 24's question, on a GPU:

    python -m bench.probe.profile_train_step --model llama-1b --shape 8x1024 --mix instruct --loss lm \\
        --methods prompt_tuning,p_tuning_v2 --variants eager,packed --attention sdpa \\
        --out bench/results/train_profile_packed.json
    python -m bench.probe.profile_train_step --model llama-1b --shape 8x1024 --mix instruct --loss lm \\
        --methods prompt_tuning,p_tuning_v2 --variants eager,packed --attention flex_attention \\
        --out bench/results/train_profile_packed_flex.json

On the CPU (a smoke run: no CUDA kernels, so the kernel fields are empty and say why):

    python -m bench.probe.profile_train_step --model tiny --shape 4x64 --mix instruct --pack-tokens 128 --loss lm \\
        --variants eager,packed --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness.kernels import is_attention, kernel_times, top_kernels
from bench.harness.report import rerun_command, write_json
from bench.harness.shapes import tokenizer
from bench.harness.steps import (MIXES, TrainBase, floor_step, our_config, our_step, peft_config, peft_step,
                                 row_lengths, text_ids)

SIDES = ("floor", "ours", "peft")
VARIANTS = ("eager", "compile", "packed")
NO_CUDA = "no CUDA device: no kernel times (a CPU smoke run)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_step(step: Callable[[], None], steps: int = 5) -> dict:
    """`steps` calls of `step` (after 3 warm-up calls) under the profiler, per step."""
    for _ in range(3):
        step()
    sync()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    return {**host_side(prof, steps), **kernel_side(prof.events(), steps, cuda)}


def host_side(prof, steps: int) -> dict:
    """Wall time, the host's waits for the device and its 15 costliest operators, per step."""
    events = prof.events()
    wall_us = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / steps
    table = prof.key_averages()
    waits = {k.key: (k.count // steps, round(k.cpu_time_total / steps / 1e3, 2)) for k in table
             if "Synchronize" in k.key or k.key in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")}
    top = sorted(table, key=lambda k: k.self_cpu_time_total, reverse=True)[:15]
    return {"wall_ms": round(wall_us / 1e3, 2), "host_waits": waits,
            "top_host_ops_ms": {k.key: round(k.self_cpu_time_total / steps / 1e3, 2) for k in top}}


def kernel_side(events, steps: int, cuda: bool) -> dict:
    """GPU busy time, kernels, the top 12 kernels and attention's share (`kernels.is_attention`)
    of the GPU time, per step; empty fields and a note without CUDA."""
    if not cuda:
        return {"gpu_busy_ms": None, "kernels_per_step": None, "attention_share": None, "attention_ms": None,
                "top_kernels": [], "kernels_note": NO_CUDA}
    by_name = kernel_times(events)
    total = sum(sum(t) for t in by_name.values())
    attention = sum(sum(t) for name, t in by_name.items() if is_attention(name))
    return {"gpu_busy_ms": round(total / steps / 1e3, 2), "kernels_per_step": sum(map(len, by_name.values())) // steps,
            "attention_ms": round(attention / steps / 1e3, 2),
            "attention_share": round(attention / total, 3) if total else None,
            "top_kernels": top_kernels(by_name, steps, most=12, width=80)}


class Setup(TrainBase):
    """The base, its batch and the rows' lengths of one profile run (`--model`, `--shape`, `--mix`).

    Attributes:
        ids: (B, S) the batch's token ids; lengths: (B,) each row's length, or None (every row S).
    """

    def __init__(self, args):
        super().__init__(**vars(TrainBase.build(args.model, tokenizer(), args.attention)))
        B, S = (int(x) for x in args.shape.split("x"))
        self.ids = text_ids(B, S, self.tok.vocab_size, self.device)
        self.lengths = row_lengths(args.mix or "fixed", B, S)


def floor_rows(run: Setup, args) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(row name, profiler of the row) of the frozen model's floor for each variant asked for."""
    from softprompt import regions

    for variant in args.variants:
        runner = regions.view(run.base, compile=True) if variant == "compile" else run.base
        packed = args.pack_tokens if variant == "packed" else None
        name = "floor " + ({"eager": "padded", "packed": "packed"}.get(variant, variant) if run.lengths else variant)
        yield name, partial(floor_row, runner, run, args, packed)


def floor_row(runner, run: Setup, args, pack_tokens: int | None) -> dict:
    """The floor's step (`steps.floor_step`) on `runner` (the base or its compiled view)."""
    return profile_step(floor_step(runner, args.loss, run.ids, run.words, lengths=run.lengths, pack_tokens=pack_tokens))


def our_rows(run: Setup, args, method: str) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(row name, profiler of the row) of softprompt's step for each variant asked for."""
    from softprompt.training.fast_path import resolved_lm_loss

    lm_loss = resolved_lm_loss("auto", run.base, run.base.device)  # as bench.train.throughput runs it
    for variant in args.variants:
        yield f"ours {method} {variant}", partial(our_row, run, args, method, variant, lm_loss)


def our_row(run: Setup, args, method: str, variant: str, lm_loss: str) -> dict:
    """softprompt's step accelerated as `variant` asks (compiled blocks, or packed rows)."""
    import softprompt as sp
    from softprompt.tasks import Verbalizer

    model = sp.SoftPromptModel(run.base, our_config(method, run.hidden), tokenizer=run.tok)
    task = Verbalizer({"positive": " great", "negative": " terrible"})
    task.bind(model)
    packed = args.pack_tokens if variant == "packed" else None
    with model.accelerated(compile=variant == "compile", lm_loss=lm_loss):
        model.train()
        row = profile_step(our_step(model, task, args.loss, run.ids, run.tok, lengths=run.lengths, pack_tokens=packed))
    return {**row, "lm_loss": lm_loss}


def peft_row(run: Setup, args, method: str) -> dict:
    """HF PEFT's step (no autocast) on the same rows, padded."""
    from peft import get_peft_model

    peft_model = get_peft_model(run.base, peft_config(method))
    peft_model.train()
    try:
        return profile_step(peft_step(peft_model, args.loss, run.ids, run.words, False, run.lengths))
    finally:
        run.base.requires_grad_(False)


def show(name: str, row: dict) -> None:
    """One line a row, then its top kernels (us per step, calls per step, whether attention)."""
    if "error" in row:
        print(f"{name}: {row['error']}", flush=True)
        return
    if row["gpu_busy_ms"] is None:
        print(f"{name}: wall {row['wall_ms']} ms; {row['kernels_note']}", flush=True)
        return
    share = row["attention_share"]
    print(f"{name}: wall {row['wall_ms']} ms, GPU busy {row['gpu_busy_ms']} ms, {row['kernels_per_step']} kernels, "
          f"attention {row['attention_ms']} ms ({'-' if share is None else f'{share:.0%}'} of GPU time)", flush=True)
    for k in row["top_kernels"]:
        mark = "attention" if is_attention(k["kernel"]) else ""
        print(f"    {k['us_per_step']:>10.1f} us {k['calls_per_step']:>7.2f}x {mark:>9}  {k['kernel']}", flush=True)


def guarded(profiled: Callable[[], dict]) -> dict:
    """The row, or the error that stopped it (one failing row is reported, the rest still run)."""
    try:
        return profiled()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--shape", default="8x256", help="BxS")
    parser.add_argument("--loss", default="cls", choices=["cls", "lm"])
    parser.add_argument("--methods", default="prompt_tuning,p_tuning_v2")
    parser.add_argument("--mix", default=None, choices=list(MIXES), help="row lengths (default: every row S tokens)")
    parser.add_argument("--pack-tokens", type=int, default=1024, help="train.pack_tokens of the packed rows")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flex_attention"],
                        help="the base's attn_implementation")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"subset of {','.join(SIDES)}")
    parser.add_argument("--variants", default="eager,compile",
                        help=f"subset of {','.join(VARIANTS)} (packed: with --mix)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.sides, args.variants = ([x for x in value.split(",") if x] for value in (args.sides, args.variants))
    args.methods = [x for x in args.methods.split(",") if x]
    for name, value, allowed in (("--sides", args.sides, SIDES), ("--variants", args.variants, VARIANTS)):
        if set(value) - set(allowed):
            parser.error(f"{name}: {', '.join(sorted(set(value) - set(allowed)))} not among {', '.join(allowed)}")
    if "packed" in args.variants and not args.mix:
        parser.error("--variants packed needs --mix (a fixed-length batch has no padding to pack away)")
    return args


def main() -> None:
    args = parse_args()
    run = Setup(args)
    report = {"command": rerun_command("bench.probe.profile_train_step", sys.argv[1:]),
              "model": args.model, "shape": args.shape, "loss": args.loss, "mix": args.mix,
              "attention": args.attention, "device": torch.cuda.get_device_name(0) if run.device == "cuda" else "CPU",
              "rows": {}}
    if run.lengths:
        B = len(run.lengths)
        report.update(lengths=run.lengths, real_tokens=sum(run.lengths), padded_tokens=B * max(run.lengths),
                      pack_tokens=args.pack_tokens)
        print(f"{args.mix} rows {run.lengths}: {report['real_tokens']} real tokens, {report['padded_tokens']} padded; "
              f"packed into sequences of at most {args.pack_tokens}; attention {args.attention}", flush=True)

    def record(name: str, row: dict) -> None:
        report["rows"][name] = row
        show(name, row)

    if "floor" in args.sides:
        for name, profiled in floor_rows(run, args):
            record(name, guarded(profiled))
    for method in args.methods:
        if "ours" in args.sides:
            for name, profiled in our_rows(run, args, method):
                record(name, guarded(profiled))
        if "peft" in args.sides:
            record(f"peft {method}", guarded(partial(peft_row, run, args, method)))
    write_json(report, args.out)
    print(json.dumps(report)[:200])


if __name__ == "__main__":
    main()
