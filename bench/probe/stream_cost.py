"""What a streamed token costs the server's event loop: `softprompt serve` in a subprocess
on loopback, N keep-alive connections each streaming 64-token greedy completions one after
another; the main thread's CPU time (the event loop: HTTP, stream chunks, socket writes;
/proc) per streamed token, per-request work included, in rounds of a few seconds. Linux only.

    python -m bench.serve.random_served --shape tiny --out /tmp/served_tiny
    python -m bench.probe.stream_cost --model /tmp/served_tiny/model --prompts /tmp/served_tiny/prompts \\
        --variants "" "--stream-interval 4" "--stream-interval 16" --label "after"

Each variant is a server started with those `softprompt serve` options; the report
(bench/results/stream_cost.json, or --out) gives each round's figure and their median.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from bench.harness.report import RESULTS, rerun_command, write_json
from bench.harness.server import serving
from bench.probe.server_cpu import device_name, measure

TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--task", default="writer", help="a served task that completes text")
    parser.add_argument("--variants", nargs="+", default=[""], help="server options per variant (quoted)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--label", default=None, help="what the code measured is (e.g. a commit)")
    parser.add_argument("--out", default=str(RESULTS / "stream_cost.json"))
    args = parser.parse_args()
    body = {"model": args.task, "prompt": "hello there", "max_tokens": TOKENS, "temperature": 0, "stream": True}
    rows = []
    for variant in args.variants:
        options = shlex.split(variant)
        with serving(args.model, args.prompts, options, Path(args.out).with_suffix(".server.log")) as (url, server):
            port = int(url.rsplit(":", 1)[1])
            measure(port, server.pid, "/v1/completions", body, args.connections, 2)  # warm-up
            rounds = [measure(port, server.pid, "/v1/completions", body, args.connections, args.seconds)
                      for _ in range(args.rounds)]
        per_token = [1000 * r["loop_cpu_ms_per_request"] / TOKENS for r in rounds]
        rows.append({"label": args.label, "options": variant or "(defaults)", "loop_us_per_token": per_token,
                     "median_loop_us_per_token": statistics.median(per_token),
                     "requests_per_s": [r["requests_per_s"] for r in rounds]})
        print(rows[-1], flush=True)
    out = Path(args.out)
    report = {"benchmark": "event-loop CPU per streamed token", "device": device_name(), "tokens": TOKENS,
              "connections": args.connections, "seconds": args.seconds,
              "command": rerun_command("bench.probe.stream_cost", sys.argv[1:]), "rows": rows}
    if out.exists():  # rows of earlier runs (another commit's label) stay beside
        import json

        earlier = json.loads(out.read_text())
        report["rows"] = [r for r in earlier.get("rows", []) if r.get("label") != args.label] + rows
    write_json(report, out)


if __name__ == "__main__":
    main()
