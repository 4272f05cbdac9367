"""HTTP serving under load: `softprompt serve` in a subprocess on loopback, N concurrent
clients sending interleaved requests of every loaded task for a fixed time.

    python -m bench.serve.http --model minilm --prompts served --clients 64 --seconds 30

The clients are `bench.harness.load.closed_loop`: each sends one request at a time (one
input), choosing the task round-robin; the endpoint follows the task (classify, tag, or
completions for tasks without a head). Reports requests/s, latency percentiles and failures
(any status but 200) in bench/results/serve_http.json, with the device and the server's
batch statistics.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import httpx
import torch

from bench.harness.load import closed_loop, free_port, metric, percentile, wait_healthy
from bench.harness.report import RESULTS, rerun_command, write_json


def serve(args) -> tuple[dict, str]:
    """Start the server, run the clients, stop it: the clients' figures and the server's /metrics."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", args.model, "--prompts",
                               args.prompts, "--port", str(port), "--device", args.device,
                               *(["--dtype", args.dtype] if args.dtype else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_healthy(url, 300, alive=lambda: server.poll() is None)
        except RuntimeError as e:
            raise SystemExit(f"the server did not start ({e}): {server.stderr.read()}") from None
        load = closed_loop(url, clients=args.clients, seconds=args.seconds)
        return load, httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.communicate(timeout=30)


def ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else 1000 * seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="the server's --dtype (bfloat16 on a GPU)")
    parser.add_argument("--out", default=str(RESULTS / "serve_http.json"))
    args = parser.parse_args()
    load, metrics = serve(args)
    latencies, wall = load["latencies"], load["wall"]
    runs = metric(metrics, "softprompt_batch_rows_count")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = {"benchmark": "HTTP serving on loopback", "command": rerun_command("bench.serve.http", sys.argv[1:]),
              "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else
              f"CPU, {torch.get_num_threads()} threads ({platform.machine()})",
              "model": args.model, "dtype": args.dtype, "tasks": load["tasks"], "clients": args.clients,
              "seconds": round(wall, 1), "requests": len(latencies), "failures": load["failures"],
              "requests_per_s": len(latencies) / wall, "latency_p50_ms": ms(percentile(latencies, 0.5)),
              "latency_p99_ms": ms(percentile(latencies, 0.99)),
              "engine_runs": runs,
              "rows_per_run": (metric(metrics, "softprompt_batch_rows_sum") or 0) / max(runs or 1, 1)}
    write_json(report, Path(args.out))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
