"""Where a training step's time goes: wall time, GPU busy time, kernel launches, host waits
and the top host-side operators, for softprompt, HF PEFT and the floor (the steps of bench.train.throughput: `bench.harness.steps`).

    python -m bench.probe.profile_train_step --model gpt2-124m --shape 8x256 --loss cls --out bench/results/train_profile.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness.steps import floor_step, our_config, our_step, peft_config, peft_step, text_ids
from bench.harness.report import write_json
from bench.harness.shapes import build_base, tokenizer


def profile_step(step, steps: int = 5) -> dict:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / steps
    starts = [e.time_range.start for e in events]
    ends = [e.time_range.end for e in events]
    wall_us = (max(ends) - min(starts)) / steps
    table = prof.key_averages()
    waits = {k.key: (k.count // steps, round(k.cpu_time_total / steps / 1e3, 2)) for k in table
             if "Synchronize" in k.key or k.key in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")}
    top = sorted(table, key=lambda k: k.self_cpu_time_total, reverse=True)[:15]
    return {"wall_ms": round(wall_us / 1e3, 2), "gpu_busy_ms": round(gpu_us / 1e3, 2),
            "kernels_per_step": len(kernels) // steps, "host_waits": waits,
            "top_host_ops_ms": {k.key: round(k.self_cpu_time_total / steps / 1e3, 2) for k in top}}


def main() -> None:
    import softprompt as sp
    from softprompt import regions
    from softprompt.tasks import Verbalizer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--shape", default="8x256")
    parser.add_argument("--loss", default="cls")
    parser.add_argument("--methods", default="prompt_tuning,p_tuning_v2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tok = tokenizer()
    base = build_base(args.model, "cuda", train=True)
    B, S = (int(x) for x in args.shape.split("x"))
    ids = text_ids(B, S, tok.vocab_size, "cuda")
    words = torch.tensor([tok.encode(" great")[0], tok.encode(" terrible")[0]], device="cuda")
    hidden = getattr(base.config, "hidden_size", None) or base.config.n_embd
    report = {"model": args.model, "shape": args.shape, "loss": args.loss, "device": torch.cuda.get_device_name(0),
              "rows": {}}
    compiled = regions.view(base, compile=True)
    for name, runner in (("floor eager", base), ("floor compile", compiled)):
        report["rows"][name] = profile_step(floor_step(runner, args.loss, ids, words))
        print(name, report["rows"][name], flush=True)
    for method in args.methods.split(","):
        for variant in ("eager", "compile"):
            model = sp.SoftPromptModel(base, our_config(method, hidden), tokenizer=tok)
            task = Verbalizer({"positive": " great", "negative": " terrible"})
            task.bind(model)
            with model.accelerated(compile=variant == "compile"):
                model.train()
                row = profile_step(our_step(model, task, args.loss, ids, tok))
            report["rows"][f"ours {method} {variant}"] = row
            print(method, variant, row, flush=True)
        from peft import get_peft_model

        peft_model = get_peft_model(base, peft_config(method))
        peft_model.train()
        row = profile_step(peft_step(peft_model, args.loss, ids, words, False))
        base.requires_grad_(False)
        report["rows"][f"peft {method}"] = row
        print("peft", method, row, flush=True)
    write_json(report, args.out)
    print(json.dumps(report)[:200])


if __name__ == "__main__":
    main()
