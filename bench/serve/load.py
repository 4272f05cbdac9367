"""The HTTP server under load and faults, on loopback: N concurrent clients sending a
seeded random mix of valid and bad requests for T seconds while an admin loads and
unloads prompts, every answer checked against the answer to the same request alone
(`bench.harness.load.run_load`: its docstring defines the mix, the checks and the report).

    python -m bench.serve.load                       # the 60 s form: 64 clients, SmolLM2-135M, CPU
    python -m bench.serve.load --clients 8 --seconds 10 --out /tmp/serve_load_trial.json   # a trial

`main` builds five prompt folders on the packaged SmolLM2-135M (freshly initialised and
saved: reliability does not depend on training), starts the real CLI server
(``softprompt serve --model smollm2-135m --prompts ... --admin``) as a subprocess on
127.0.0.1, runs `run_load` and writes bench/results/serve_load_cpu.json atomically, with
the tail of the server's log. The CI form (tests/robustness/test_server_load.py) runs the
same `run_load` for a few seconds against an in-process server on a tiny random Llama.
The 60 s form takes about 2.5 minutes on 2 cores (two model loads, the alone answers, the
load); it exits non-zero when there was any failure, after writing the report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness.load import KINDS, free_port, run_load, save_prompts, wait_healthy
from bench.harness.report import RESULTS, device_name, rerun_command, versions, write_json


# -- the 60 s form: the CLI server in a subprocess ----------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a causal LM (alias or path): all five tasks on it")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the prompt folders go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="default: bench/results/serve_load_cpu.json")
    args = parser.parse_args()
    import torch

    from softprompt.base_models import load_base

    out = Path(args.out) if args.out else RESULTS / "serve_load_cpu.json"
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(args.workdir or tmp) / "prompts"
        base, tokenizer = load_base(args.model)
        plan = save_prompts(base, tokenizer, prompts)
        plan.churn_pause = (0.05, 8.0)  # requests wait seconds in the queue: some states must last that long
        del base
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w+")
        server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", args.model, "--prompts",
                                   str(prompts), "--port", str(port), "--device", "cpu", "--admin"],
                                  stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            wait_healthy(url, 600, alive=lambda: server.poll() is None)
            report = run_load(url, plan, clients=args.clients, seconds=args.seconds, seed=args.seed, pid=server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.seek(0)
            server_log = log.read()
            log.close()
    threads = os.environ.get("OMP_NUM_THREADS")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    report = {"benchmark": "HTTP server under load and faults (loopback)",
              "command": rerun_command("bench.serve.load", sys.argv[1:]),
              "device": device_name(), "cpu": cpu, "cpu_count": os.cpu_count(), "omp_num_threads": threads,
              "torch_threads": torch.get_num_threads(), "versions": versions(), "model": args.model,
              "tasks": {"classify": plan.classify, "tag": plan.tag, "complete": plan.complete,
                        "churned": list(plan.churn_paths)},
              "mix": KINDS, "server_log_tail": server_log[-2000:], **report}
    write_json(report, out)
    print(json.dumps({k: v for k, v in report.items() if k not in ("versions", "server_log_tail")}, indent=1))
    if report["failures"]:
        raise SystemExit(f"{report['failures']} failures (see {out})")


if __name__ == "__main__":
    main()
