"""HTTP serving under load: `softprompt serve` in a subprocess on loopback, N concurrent
clients, each sending one request at a time, in phases of a fixed time.

    python -m bench.serve.random_served --shape llama-1b --out /tmp/served
    python -m bench.serve.http --model /tmp/served/model --prompts /tmp/served/prompts --dtype bfloat16 --compile

Phases (`--phases`), each after the same server's warm-up: ``heads`` (classify and tag
requests only), ``generation`` (16-token completions, streamed, and 16-token chat
completions) and ``mix`` (all four kinds, a quarter of the clients each). Client k sends
one kind of request (`bench.harness.closed_loop`: asyncio httpx clients spread over
`--processes` processes, so that the load generator does not set the pace).

Reported per phase and kind: requests/s, latency p50 / p99, time to the first token of
streamed completions (p50 / p99), generated tokens/s, failures (any status but 200), and
the server's engine runs and rows per run (from /metrics, before and after the phase),
in bench/results/serve_http*.json with the device and the server's options.

Where the latency goes, from the server's own clock (/metrics, before and after the
phase; `softprompt.serve.timeline`): per kind, ``stages_ms``, the mean milliseconds of each
stage of a request (parse: to the batcher; queue: waiting for the batcher's worker;
engine: the run up to its answer; handoff: back to the event loop; respond: the answer
written), which add up to its mean time in the server, and ``outside_server_ms``, what the
clients' mean latency (``latency_mean_ms``) adds to them (loopback sockets, uvicorn before
the app, the clients' own time); per phase, ``batcher``: the mean gathering window before
an engine run, the mean run time, and the share of the phase's wall time the worker spent
gathering or running (the rest: waiting for a first request, or its own work between
runs; None in a phase that decodes, whose runs hold runs of head requests);
``engine_phases_share``, the engine's host seconds in each phase of its runs (checking,
tokenizing, making rows, queueing head batches' forwards, reading their answers: the
device's outputs waited for there) as shares of the phase's wall time; and
``server_cores``, the cores each server thread kept busy through the phase (from
/proc: `bench.harness.server.thread_cpu`): the event loop's and the engine worker's sum
near 1 says the two Python threads, taking the GIL in turn, set the pace, not the GPU. The
stage and cores lines of each phase are printed as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from bench.harness.closed_loop import GENERATION_KINDS, HEAD_KINDS, closed_loop
from bench.harness.server import event_loop, labelled, metric, percentile, serving, thread_cpu
from bench.harness.report import RESULTS, rerun_command, write_json

PHASES = {"heads": HEAD_KINDS, "generation": GENERATION_KINDS, "mix": HEAD_KINDS + GENERATION_KINDS}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def engine_counts(url: str) -> dict[tuple[str, ...], float]:
    """The server's counters so far (its /metrics), for a phase's figures as the difference
    of two: its engine runs and their rows, run seconds, gathering windows and their
    seconds, and per (kind, stage) of a request (`timeline.STAGES`), requests and seconds.
    A run is counted when it ends; a decode run takes in joining rows while it lasts, so it
    can span phases: in a phase with decoding, run times are not per-phase figures."""
    text = httpx.get(f"{url}/metrics").text
    counts = {(name,): metric(text, f"softprompt_batch_{name}") or 0.0
              for name in ("rows_count", "rows_sum", "seconds_sum", "gather_seconds_count", "gather_seconds_sum")}
    for what in ("count", "sum"):
        for (kind, stage), value in labelled(text, f"softprompt_request_stage_seconds_{what}").items():
            counts[("stage", kind, stage, what)] = value
    for (phase,), value in labelled(text, "softprompt_engine_phase_seconds").items():
        counts[("phase", phase)] = value
    for (kind,), value in labelled(text, "softprompt_cuda_graphs").items():
        counts[("graphs", kind)] = value
    return counts


def stage_means(counts: dict[tuple[str, ...], float]) -> dict[str, dict[str, float | None]]:
    """Per kind, the mean milliseconds of each stage over the requests `counts` (a phase's
    difference of `engine_counts`) holds, and ``requests``, how many those are."""
    kinds: dict[str, dict[str, float | None]] = {}
    for key, requests in counts.items():
        if key[0] == "stage" and key[3] == "count" and requests > 0:
            _, kind, stage, _ = key
            kinds.setdefault(kind, {"requests": requests})[stage] = ms(counts[("stage", kind, stage, "sum")] / requests)
    return kinds


def cores_in_use(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Each server thread's CPU seconds over a phase of `seconds` (`thread_cpu` before and
    after) as cores in use, the busiest first; ``python threads``: the event loop's and the
    engine worker's sum (near 1: the GIL they share is never free)."""
    cores = {k: round((v - before.get(k, 0.0)) / seconds, 3) for k, v in after.items()}
    cores = {k: v for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.005}
    cores["python threads"] = round(cores.get("event loop", 0.0) + cores.get("batcher", 0.0), 3)
    return cores


def phase_report(load: dict, counts: dict[tuple[str, ...], float]) -> dict:
    """Figures of one phase from `closed_loop`'s records and the server's counters over it
    (`engine_counts`, after minus before)."""
    wall, kinds = load["wall"], {}
    runs, rows = counts[("rows_count",)], counts[("rows_sum",)]
    stages = stage_means(counts)
    for kind, r in load["kinds"].items():
        kinds[kind] = {"clients": r["clients"], "requests": len(r["latency"]), "requests_per_s": len(r["latency"]) / wall,
                       "latency_p50_ms": ms(percentile(r["latency"], 0.5)),
                       "latency_p99_ms": ms(percentile(r["latency"], 0.99)),
                       "failures": r["failures"]}
        if r["ttft"]:
            kinds[kind].update(ttft_p50_ms=ms(percentile(r["ttft"], 0.5)), ttft_p99_ms=ms(percentile(r["ttft"], 0.99)))
        if kind in GENERATION_KINDS:
            kinds[kind]["tokens_per_s"] = sum(r["tokens"]) / wall
            kinds[kind]["tokens_per_answer"] = sum(r["tokens"]) / max(len(r["tokens"]), 1)
        if kind in stages:  # the client's mean latency beyond the server's stages: sockets, uvicorn, the clients
            kinds[kind]["stages_ms"] = stages[kind]
            mean = sum(r["latency"]) / len(r["latency"]) if r["latency"] else None
            kinds[kind]["latency_mean_ms"] = ms(mean)
            in_server = sum(v for k, v in stages[kind].items() if k != "requests" and v is not None)
            kinds[kind]["outside_server_ms"] = None if mean is None else round(1000 * mean - in_server, 2)
    every = [x for r in load["kinds"].values() for x in r["latency"]]
    gathered, gathering, running = counts[("gather_seconds_count",)], counts[("gather_seconds_sum",)], \
        counts[("seconds_sum",)]
    return {"seconds": round(wall, 1), "tasks": load["tasks"], "kinds": kinds,
            "requests_per_s": len(every) / wall, "latency_p99_ms": ms(percentile(every, 0.99)),
            "failures": sum(sum(r["failures"].values()) for r in load["kinds"].values()),
            "engine_runs": runs, "rows_per_run": rows / max(runs, 1),
            "batcher": {"gathered_runs": gathered,
                        "gather_mean_ms": ms(gathering / gathered) if gathered else None,
                        "run_mean_ms": ms(running / runs) if runs else None,
                        # runs of heads between two decode steps are counted apart and inside their decode run
                        "busy_share": round((gathering + running) / wall, 3) if gathered == runs else None},
            # the engine's host seconds per phase of its runs (`Engine.PHASES`), as shares of the phase's wall time
            "engine_phases_share": {key[1]: round(v / wall, 3) for key, v in counts.items() if key[0] == "phase"},
            # CUDA graphs captured in the phase (shapes the warm-up had not met), by kind
            "graphs_captured": {key[1]: int(v) for key, v in counts.items() if key[0] == "graphs"}}


def serve(args, report: dict) -> dict:
    """Start the server, warm it up, run each phase, stop it. The report is written after
    the warm-up and after every phase (a run cut short by a time limit keeps what it
    measured), and the server's log goes to a file beside it (`--server-log`)."""
    log_path = Path(args.server_log or Path(args.out).with_suffix(".server.log"))
    phases = report["phases"] = {}
    started = time.monotonic()
    with serving(args.model, args.prompts, report["options"], log_path) as (url, server):
        report["server_start_s"] = round(time.monotonic() - started, 1)
        print(f"server up in {report['server_start_s']} s", flush=True)
        if args.warmup > 0:  # compiles and captures the shapes the phases meet
            started = time.monotonic()
            closed_loop(url, clients=args.clients, seconds=args.warmup, processes=args.processes)
            report["warmup_wall_s"] = round(time.monotonic() - started, 1)
            print(f"warm-up done in {report['warmup_wall_s']} s", flush=True)
            write_json(report, Path(args.out))
        for name in args.phases:
            before = engine_counts(url)
            if args.profile and name == args.phases[-1]:  # py-spy samples the server in the last phase
                profiler = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-d", str(int(args.seconds)),
                                             "-r", "200", "--threads", "--nonblocking", "-f", "raw", "-o", args.profile,
                                             *(["--idle"] if args.profile_idle else [])],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            cpu_before, started = thread_cpu(server.pid), time.monotonic()
            load = closed_loop(url, clients=args.clients, seconds=args.seconds, kinds=PHASES[name],
                               processes=args.processes)
            cpu = cores_in_use(cpu_before, thread_cpu(server.pid), time.monotonic() - started)
            after = engine_counts(url)
            phases[name] = phase = phase_report(load, {k: v - before.get(k, 0.0) for k, v in after.items()})
            phase["server_cores"] = cpu
            write_json(report, Path(args.out))
            print(name, json.dumps({k: {x: v[x] for x in ("requests_per_s", "latency_p50_ms", "latency_p99_ms")}
                                    for k, v in phase["kinds"].items()}), flush=True)
            print(name, "stages_ms", json.dumps({k: {**v["stages_ms"], "outside_server": v["outside_server_ms"]}
                                                 for k, v in phase["kinds"].items() if "stages_ms" in v}),
                  "batcher", json.dumps(phase["batcher"]), flush=True)
            print(name, "server_cores", json.dumps(cpu), "engine_phases_share", json.dumps(phase["engine_phases_share"]),
                  "graphs_captured", json.dumps(phase["graphs_captured"]), flush=True)
        if args.profile:
            profiler.wait(timeout=60)
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=10, help="seconds of the mix before the phases (not counted)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="client processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="the server's --dtype (bfloat16 on a GPU)")
    parser.add_argument("--compile", action="store_true", help="the server's --compile")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `softprompt serve` options")
    parser.add_argument("--profile", default=None, help="py-spy raw samples of the server in the last phase, to FILE")
    parser.add_argument("--profile-idle", action="store_true",
                        help="--profile samples idle threads too (py-spy --idle): each thread's stack at every tick, "
                             "so that its wall time (waits on the GPU, the queue, the GIL) shows, not only its CPU time")
    parser.add_argument("--label", default=None, help="what this run measures (the report's first column)")
    parser.add_argument("--out", default=str(RESULTS / "serve_http_kinds.json"))
    parser.add_argument("--server-log", default=None, help="the server's output (default: beside --out, .server.log)")
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = {"benchmark": "HTTP serving on loopback, per kind of request",
              "command": rerun_command("bench.serve.http", sys.argv[1:]),
              "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else
              f"CPU, {os.cpu_count()} cores ({platform.machine()})",
              "label": args.label, "model": args.model, "dtype": args.dtype, "clients": args.clients,
              "client_processes": args.processes, "warmup_s": args.warmup,
              "event_loop": event_loop(),
              "options": ["--device", args.device, *(["--dtype", args.dtype] if args.dtype else []),
                          *(["--compile"] if args.compile else []), *args.server_args]}
    serve(args, report)
    write_json(report, Path(args.out))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
