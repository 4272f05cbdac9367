"""Replicas on Ray Serve against one process, and what task-affine routing saves in prompt
reads (`serve.ray`, issue 22), on the CPU.

    python -m bench.serve.ray_routing --tasks 1000 --seconds 20     # writes bench/results/ray_routing_cpu.json

A tiny Llama (`bench.harness.shapes`, "tiny") and `--tasks` copies of one prompt folder
(prompt tuning, 8 virtual tokens). `--clients` threads each send one completion at a time
(1 new token) for `--seconds`, the task of each drawn from a Zipf law over the tasks (a few
hot, a long tail: s = `--zipf`, the same seeded draws for every configuration). Configurations:

  one process    `create_app` on a bank of the same folders, lazy, `--max-in-memory` tasks read
  replicas       `--replicas` replicas, each at most `--max-in-memory` tasks read, requests
                 routed by task (Ray Serve's multiplexing)
  no affinity    the same replicas, requests sent wherever Ray Serve's load balancing picks

Reported: requests/s, latency p50 / p99, and prompt folders read (each replica's
`x-softprompt-reads` at its last answer, summed) per second and per request: a task held
by one replica is read once; spread over every replica, once per replica, and again when
its memory cap drops it.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from bench.harness.load import free_port, percentile, wait_healthy
from bench.harness.report import RESULTS, rerun_command, versions, write_json
from bench.harness.shapes import build_base, tokenizer


def make_store(root: Path, tasks: int) -> tuple[Path, Path]:
    """A saved tiny model and `tasks` prompt folders: (model folder, prompts folder)."""
    import softprompt as sp

    base, tok = build_base("tiny"), tokenizer()
    model_dir = root / "tiny"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = root / "prompts"
    torch.manual_seed(0)
    sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:8] {text}", init="vocab"),
                       tokenizer=tok).save_pretrained(prompts / "t0000")
    for i in range(1, tasks):
        shutil.copytree(prompts / "t0000", prompts / f"t{i:04d}")
    return model_dir, prompts


def draws(tasks: int, n: int, s: float, seed: int = 0) -> list[str]:
    """n task names drawn from a Zipf law of exponent s over the tasks."""
    weights = [1 / (k + 1) ** s for k in range(tasks)]
    return random.Random(seed).choices([f"t{i:04d}" for i in range(tasks)], weights=weights, k=n)


def load(url: str, names: list[str], clients: int, seconds: float) -> dict:
    """Closed-loop clients over the drawn task names, for `seconds`."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    reads: dict[str, int] = {}  # replica -> its last reported folder reads
    lock = threading.Lock()
    stop_at = time.time() + seconds
    cursor = iter(range(len(names)))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.time() < stop_at:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                body = {"model": names[i], "prompt": "a gem of a film", "max_tokens": 1, "temperature": 0}
                start = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if r.status_code != 200:
                        failures[str(r.status_code)] = failures.get(str(r.status_code), 0) + 1
                        continue
                    latencies.append(elapsed)
                    replica = r.headers.get("x-softprompt-replica", "one process")
                    if "x-softprompt-reads" in r.headers:
                        reads[replica] = max(reads.get(replica, 0), int(r.headers["x-softprompt-reads"]))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "latency_p50_ms": 1e3 * percentile(latencies, 0.5), "latency_p99_ms": 1e3 * percentile(latencies, 0.99),
            "failures": failures, "replicas_answering": len(reads), "reads_by_replica": reads}


def main() -> None:
    import ray
    from ray import serve

    from softprompt.base_models import load_base
    from softprompt.serve import Engine, PromptBank, create_app
    from softprompt.serve.ray import deployment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-in-memory", type=int, default=200, help="tasks read at once, per replica")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--out", default=str(RESULTS / "ray_routing_cpu.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray_routing_"))
    report = {"benchmark": "Ray Serve replicas and task-affine routing", "device": f"CPU ({platform.machine()})",
              "versions": versions(), "command": rerun_command("bench.serve.ray_routing", sys.argv[1:]),
              "settings": vars(args) | {"out": None}, "results": {}}
    try:
        model_dir, prompts = make_store(root, args.tasks)
        names = draws(args.tasks, 1_000_000, args.zipf)
        # one process: the single-process server in a thread of this process
        import uvicorn

        base, tok = load_base(str(model_dir))
        bank = PromptBank.from_directory(base, tok, prompts, lazy=True, max_in_memory=args.max_in_memory)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(bank, engine=Engine(bank)), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_healthy(f"http://127.0.0.1:{port}", 60)
        result = load(f"http://127.0.0.1:{port}", names, args.clients, args.seconds)
        result["reads_by_replica"] = {"one process": bank.reads}
        report["results"]["one process"] = result
        server.should_exit = True
        thread.join(timeout=30)
        print("one process", result, flush=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, affinity in (("replicas", True), ("no affinity", False)):
                serve.run(deployment(str(model_dir), prompts, replicas=args.replicas,
                                     max_tasks_per_replica=args.max_in_memory, affinity=affinity),
                          name="softprompt", route_prefix="/")
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, 120)
                result = load(url, names, args.clients, args.seconds)
                report["results"][name] = result
                print(name, result, flush=True)
                serve.delete("softprompt")
        finally:
            serve.shutdown()
            ray.shutdown()
        for r in report["results"].values():
            total = sum(r["reads_by_replica"].values())
            r["folder_reads"] = total
            r["reads_per_s"] = total / r["wall_s"]
            r["reads_per_request"] = total / max(r["requests"], 1)
        write_json(report, Path(args.out))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
