"""The server's own CPU time per request, by endpoint: `softprompt serve` in a subprocess
on loopback, N keep-alive connections sending one request at a time for a few seconds
each; the server process's CPU time (user + system, /proc) over the requests answered.
The client is plain asyncio sockets (HTTP/1.1 by hand), light enough to leave the
server the cores it needs on a small machine. Linux only (/proc).

    python -m bench.serve.random_served --shape tiny --out /tmp/served_tiny
    python -m bench.probe.server_cpu --model /tmp/served_tiny/model --prompts /tmp/served_tiny/prompts

Reports, per endpoint (/health, a classify request, a 16-token greedy completion, the same
completion streamed; and lm-eval's loglikelihood request, 3 rows of 157 token ids with
``echo: true, logprobs: 1, max_tokens: 1``, beside the same 3 texts classified: what
`bench.serve.scoring` compares on a GPU): requests/s, p50 / p99 latency, the server's CPU ms per request and
the part of it on the event loop's thread (the main thread: HTTP, validation, answers and
stream chunks; the rest is the engine's worker thread and the libraries' own threads), in
bench/results/server_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.harness.server import cpu_seconds, percentile, serving
from bench.harness.report import RESULTS, rerun_command, write_json

REQUESTS = {
    "/health": None,
    "/v1/classify": {"task": "topic", "inputs": ["hello there"]},
    "/v1/completions": {"model": "writer", "prompt": "hello there", "max_tokens": 16, "temperature": 0},
    "/v1/completions (stream)": {"model": "writer", "prompt": "hello there", "max_tokens": 16, "temperature": 0,
                                 "stream": True},
}
#: lm-eval's loglikelihood request (a document's 3 choices, ``local-completions``' default arguments)
#: and the same rows classified; token ids any tokenizer of over 1,200 tokens has
SCORED_IDS = list(range(1000, 1157))


def scoring_requests(tokenizer) -> dict[str, dict]:
    text = tokenizer.decode(SCORED_IDS)
    return {"/v1/classify (3 rows of 157 tokens)": {"task": "topic", "inputs": [text] * 3},
            "/v1/completions (echo scoring, 3 rows of 157 tokens)": {
                "model": "reader", "prompt": [SCORED_IDS] * 3, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0}}


#: the last event of a stream, and the end of a chunked body
STREAM_END = b"data: [DONE]\n\n\r\n0\r\n\r\n"


async def _connection(port: int, request: bytes, stop: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.perf_counter() < stop:
        start = time.perf_counter()
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():  # a stream: to its last event and the body's end
            await reader.readuntil(STREAM_END)
        else:
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"answered {head[:60]!r}")
        latencies.append(time.perf_counter() - start)
    writer.close()


def measure(port: int, pid: int, path: str, body: dict | None, connections: int, seconds: float) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    request = (f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
               f"\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data
    latencies: list[float] = []
    before, loop_before = cpu_seconds(pid), cpu_seconds(pid, pid)  # the main thread's id is the process's

    async def run() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_connection(port, request, stop, latencies) for _ in range(connections)))

    asyncio.run(run())
    used, loop_used = cpu_seconds(pid) - before, cpu_seconds(pid, pid) - loop_before
    return {"requests_per_s": len(latencies) / seconds, "latency_p50_ms": 1000 * percentile(latencies, 0.5),
            "latency_p99_ms": 1000 * percentile(latencies, 0.99), "server_cpu_ms_per_request": 1000 * used / len(latencies),
            "loop_cpu_ms_per_request": 1000 * loop_used / len(latencies)}


def device_name() -> str:
    """The GPU the server runs on where there is one (its host's cores beside), else the CPU."""
    import torch

    cores = f"{os.cpu_count()} cores ({platform.machine()})"
    return f"{torch.cuda.get_device_name()}, {cores}" if torch.cuda.is_available() else f"CPU, {cores}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--label", default=None)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more `softprompt serve` options (--dtype bfloat16 on a GPU)")
    parser.add_argument("--out", default=str(RESULTS / "server_cpu.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    requests = {**REQUESTS, **scoring_requests(AutoTokenizer.from_pretrained(args.model))}
    with serving(args.model, args.prompts, args.server_args, Path(args.out).with_suffix(".server.log")) as (url, server):
        port = int(url.rsplit(":", 1)[1])
        measure(port, server.pid, "/v1/completions", REQUESTS["/v1/completions"], args.connections, 1)  # warm-up
        results = {name: measure(port, server.pid, name.split()[0], body, args.connections, args.seconds)
                   for name, body in requests.items()}
    report = {"benchmark": "server CPU per request", "command": rerun_command("bench.probe.server_cpu", sys.argv[1:]),
              "label": args.label, "device": device_name(),
              "server_args": args.server_args,
              "connections": args.connections, "seconds": args.seconds, "results": results}
    write_json(report, Path(args.out))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
