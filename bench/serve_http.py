"""HTTP serving under load: `softprompt serve` in a subprocess on loopback, N concurrent
clients sending interleaved requests of every loaded task for a fixed time.

    python bench/serve_http.py --model minilm --prompts served --clients 64 --seconds 30

Each client sends one request at a time (one input), choosing the task round-robin; the
endpoint follows the task (classify, tag, or completions for tasks without a head).
Reports requests/s, latency percentiles and failures (any status but 200) in
bench/results/serve_http.json, with the device and the server's batch statistics.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, free_port, wait_healthy, write_json  # noqa: E402

TEXTS = ["a gem of a film", "Anna flew to Paris with Lufthansa", "the plot wanders but the cast holds it together",
         "a dull , lifeless mess", "Microsoft opened an office in Berlin", "great fun for the whole family"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def command(argv: list[str]) -> str:
    """The rerun command: the arguments given, less where the report was written."""
    kept = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")
            and not a.startswith("--out=")]
    return " ".join(["python bench/serve_http.py", *kept])


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
        models = httpx.get(f"{url}/v1/models").json()["data"]
        plan = []
        for m in models:
            if m["task"] == "ner":
                plan.append((m["id"], "/v1/tag", lambda t, x: {"task": t, "inputs": [x]}))
            elif m["task"] in (None, "generation"):
                plan.append((m["id"], "/v1/completions",
                             lambda t, x: {"model": t, "prompt": x, "max_tokens": 16, "temperature": 0}))
            else:
                plan.append((m["id"], "/v1/classify", lambda t, x: {"task": t, "inputs": [x]}))
        latencies: list[float] = []
        failures: dict[str, int] = {}
        lock = threading.Lock()
        stop_at = time.time() + args.seconds

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                i = k
                while time.time() < stop_at:
                    task, endpoint, body = plan[i % len(plan)]
                    start = time.perf_counter()
                    r = c.post(endpoint, json=body(task, TEXTS[i % len(TEXTS)]))
                    elapsed = time.perf_counter() - start
                    with lock:
                        if r.status_code == 200:
                            latencies.append(elapsed)
                        else:
                            failures[str(r.status_code)] = failures.get(str(r.status_code), 0) + 1
                    i += 1

        started = time.time()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - started
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.communicate(timeout=30)

    def metric(name: str) -> float | None:
        line = next((x for x in metrics.splitlines() if x.startswith(name + " ")), None)
        return float(line.split()[-1]) if line else None

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = {"benchmark": "HTTP serving on loopback", "command": command(sys.argv[1:]),
              "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else
              f"CPU, {torch.get_num_threads()} threads ({platform.machine()})",
              "model": args.model, "dtype": args.dtype, "tasks": [m["id"] for m in models], "clients": args.clients,
              "seconds": round(wall, 1), "requests": len(latencies), "failures": failures,
              "requests_per_s": len(latencies) / wall, "latency_p50_ms": 1000 * percentile(latencies, 0.5),
              "latency_p99_ms": 1000 * percentile(latencies, 0.99),
              "engine_runs": metric("softprompt_batch_rows_count"), "rows_per_run":
              (metric("softprompt_batch_rows_sum") or 0) / max(metric("softprompt_batch_rows_count") or 1, 1)}
    write_json(report, Path(args.out))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
