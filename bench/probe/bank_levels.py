"""The prompt bank's levels on the host: start-up with every prompt folder read against
folders only registered (`PromptBank.from_directory(lazy=True)`, `softprompt serve --lazy`),
the first request's read of one folder (disk to host memory), and a task read again after
the host-memory cap dropped it (`max_in_memory`).

    python -m bench.probe.bank_levels --tasks 1000       # CPU; writes bench/results/bank_levels_cpu.json

The tasks are copies of one P-tuning v2 prompt (20 virtual tokens) on the packaged MiniLM:
every folder is read in full (JSON, safetensors, the template parsed, the prompt checked).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, rerun_command, versions, write_json


def main() -> None:
    import softprompt as sp
    from softprompt.base_models import load_base
    from softprompt.serve import PromptBank

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "bank_levels_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_base(args.model)
    root = Path(tempfile.mkdtemp(prefix="bank_levels_"))
    try:
        torch.manual_seed(0)
        model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=20, template="{text}"), tokenizer=tok)
        model.save_pretrained(root / "t00000")
        for i in range(1, args.tasks):
            shutil.copytree(root / "t00000", root / f"t{i:05d}")
        results = {}
        for lazy in (True, False):
            started = time.perf_counter()
            bank = PromptBank.from_directory(base, tok, root, lazy=lazy, max_in_memory=args.tasks // 2)
            startup = time.perf_counter() - started
            middle = f"t{args.tasks // 2:05d}"
            started = time.perf_counter()
            bank[middle]
            first = time.perf_counter() - started
            results["registered" if lazy else "read_at_startup"] = {
                "startup_s": startup, "startup_ms_per_task": 1e3 * startup / args.tasks,
                "first_lookup_ms": 1e3 * first, "folders_read": bank.reads}
        # a task dropped by the cap (the least recently used) read again on its next request
        bank = PromptBank.from_directory(base, tok, root, lazy=True, max_in_memory=1)
        bank["t00000"], bank["t00001"]
        started = time.perf_counter()
        bank["t00000"]
        results["read_again_after_eviction_ms"] = 1e3 * (time.perf_counter() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"benchmark": "prompt bank levels (host)", "command": rerun_command("bench.probe.bank_levels", sys.argv[1:]),
              "device": f"CPU, {args.threads} threads ({platform.machine()})", "model": args.model,
              "tasks": args.tasks, "versions": versions(), "results": results}
    write_json(report, Path(args.out))
    print(results)


if __name__ == "__main__":
    main()
