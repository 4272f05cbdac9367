"""lm-eval-style scoring over HTTP against the engine's own classification, in one server
run (issue 27 item 7): `softprompt serve` in a subprocess on loopback, N closed-loop clients.

    python -m bench.serve.random_served --shape llama-1b --out /tmp/served
    python -m bench.serve.scoring --model /tmp/served/model --prompts /tmp/served/prompts --dtype bfloat16

Documents (seeded): a context and 2-4 continuations, 64-256 tokens a row. Two phases on
the same server, each after a warm-up of both:

* ``score``: what lm-eval's ``local-completions`` sends for a loglikelihood task with its
  default arguments, one document per request: ``prompt`` as token ids (context +
  continuation, one list per choice), ``echo: true, logprobs: 1, max_tokens: 1,
  temperature: 0``, to ``reader`` (prompt tuning, 20 virtual tokens, no head);
* ``classify``: the same texts through ``/v1/classify`` of ``topic`` (prompt tuning, 20
  virtual tokens, a classification head): the engine's head throughput on the same rows.

Reported per phase: rows/s (a row: one choice), real tokens/s, latency p50 / p99,
failures, and model FLOP utilisation (2 x non-embedding parameters per token, attention,
and the LM head at every scored position for ``score``; against the card's dense bf16
peak); the ratio score / classify in rows/s is the figure of the issue (target >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.harness.closed_loop import closed_loop
from bench.harness.report import RESULTS, rerun_command, write_json
from bench.harness.server import event_loop, percentile, serving

# torch is imported inside the functions that need it: the client processes (spawned, so
# they import this module again) start in a second instead of ten

SCORE_TASK, CLASSIFY_TASK, VIRTUAL = "reader", "topic", 20


def documents(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """`count` documents: ``context`` and ``choices`` (2-4 texts), each context + choice
    64-256 tokens; ``ids``: each row's token ids as lm-eval sends them (the tokenizer's,
    of context + choice)."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if w.startswith(" ") and w[1:].isalpha()]
    docs = []
    for _ in range(count):
        total = rng.randint(64, 256)
        choices = [" " + " ".join(rng.choices(words, k=rng.randint(2, 8))).strip() for _ in range(rng.randint(2, 4))]
        context = " ".join(rng.choices(words, k=total)).strip()
        context_ids = tokenizer(context)["input_ids"][: total - 8]
        context = tokenizer.decode(context_ids)
        rows = [context + c for c in choices]
        docs.append({"context": context, "choices": choices, "rows": rows,
                     "ids": [tokenizer(r)["input_ids"] for r in rows]})
    return docs


def bodies(docs: list[dict]) -> dict[str, list[tuple[str, dict]]]:
    return {"score": [("/v1/completions", {"model": SCORE_TASK, "prompt": d["ids"], "echo": True, "logprobs": 1,
                                           "max_tokens": 1, "temperature": 0, "seed": 1234}) for d in docs],
            "classify": [("/v1/classify", {"task": CLASSIFY_TASK, "inputs": d["rows"]}) for d in docs]}


def flops_per_row(model_dir: str, docs: list[dict]) -> dict[str, float]:
    """Mean FLOPs of one row of each phase (a forward of its real and virtual tokens; the LM
    head at each scored token for ``score``, none for ``classify``'s head)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.harness.hardware import forward_flops

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    lengths = [len(ids) for d in docs for ids in d["ids"]]
    score = sum(forward_flops(base, 1, n + VIRTUAL, lm_head_columns=n) for n in lengths) / len(lengths)
    classify = sum(forward_flops(base, 1, n + VIRTUAL + 1, lm_head_columns=0) for n in lengths) / len(lengths)
    return {"score": score, "classify": classify, "mean_tokens": sum(lengths) / len(lengths)}


def phase(load: dict, kind: str, flops: float, peak: float | None) -> dict:
    r, wall = load["kinds"][kind], load["wall"]
    rows = sum(r["rows"])
    out = {"seconds": round(wall, 1), "clients": r["clients"], "requests": len(r["latency"]),
           "rows": rows, "rows_per_s": rows / wall,
           "latency_p50_ms": round(1000 * (percentile(r["latency"], 0.5) or 0), 1),
           "latency_p99_ms": round(1000 * (percentile(r["latency"], 0.99) or 0), 1),
           "failures": r["failures"], "model_tflops": rows * flops / wall / 1e12}
    if peak:
        out["mfu"] = out["model_tflops"] / peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=8, help="seconds of each kind before the phases")
    parser.add_argument("--documents", type=int, default=512)
    parser.add_argument("--processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--label", default=None)
    parser.add_argument("--profile", default=None, help="py-spy raw samples of the server in the score phase, to FILE")
    parser.add_argument("--out", default=str(RESULTS / "serve_scoring.json"))
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from bench.harness.hardware import peak_tflops

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    docs = documents(AutoTokenizer.from_pretrained(args.model), args.documents)
    flops = flops_per_row(args.model, docs)
    peak = peak_tflops(name) if device.startswith("cuda") else None
    report = {"benchmark": "lm-eval-style scoring (echo, logprobs 1, max_tokens 1) vs classification, over HTTP",
              "command": rerun_command("bench.serve.scoring", sys.argv[1:]), "device": name, "label": args.label,
              "model": args.model, "dtype": args.dtype, "clients": args.clients, "client_processes": args.processes,
              "event_loop": event_loop(),
              "documents": args.documents, "mean_tokens_per_row": flops["mean_tokens"],
              "rows_per_request": sum(len(d["rows"]) for d in docs) / len(docs),
              "gflop_per_row": {k: flops[k] / 1e9 for k in ("score", "classify")}, "peak_tflops": peak,
              "options": ["--device", args.device, *(["--dtype", args.dtype] if args.dtype else []), *args.server_args]}
    requests = bodies(docs)
    log_path = Path(args.out).with_suffix(".server.log")
    with serving(args.model, args.prompts, report["options"], log_path) as (url, server):
        if args.warmup > 0:
            closed_loop(url, clients=args.clients, seconds=args.warmup, processes=args.processes, bodies=requests)
        phases = report["phases"] = {}
        for kind in ("classify", "score"):
            started = time.monotonic()
            if args.profile and kind == "score":  # py-spy samples every thread of the server
                profiler = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-d", str(int(args.seconds)),
                                             "-r", "200", "--threads", "--nonblocking", "-f", "raw", "-o", args.profile],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            load = closed_loop(url, clients=args.clients, seconds=args.seconds, processes=args.processes,
                               bodies={kind: requests[kind]})
            phases[kind] = phase(load, kind, flops[kind], peak)
            print(kind, json.dumps(phases[kind]), f"({time.monotonic() - started:.0f} s)", flush=True)
            write_json(report, Path(args.out))
    if args.profile:
        profiler.wait(timeout=60)
    report["score_over_classify_rows"] = phases["score"]["rows_per_s"] / phases["classify"]["rows_per_s"]
    write_json(report, Path(args.out))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
