"""docs/PERFORMANCE.md's section on where an HTTP request's time goes: each stage of a
request from the server's own clock, the time outside the server, the batcher's gathering
windows and runs, and the cores each server thread kept busy (`bench.serve.http`'s
``stages_ms``, ``batcher`` and ``server_cores``), one row per run, phase and kind of request."""

from __future__ import annotations

from bench.harness.report import load_report

#: the runs that measured stages and cores, oldest first (the labels say what each changed)
STAGE_REPORTS = ["serve_http_stages_h100.json", "serve_http_switch_h100.json"]
STAGES = ("parse", "queue", "engine", "handoff", "respond")


def http_stages() -> list[str]:
    reports = [r for name in STAGE_REPORTS if (r := load_report(name)) is not None]
    if not reports:
        return []
    lines = ["### Where a request's time goes (issue 20 item 3; `bench.serve.http`)", "",
             "Each request's stages from the server's clock (`softprompt.serve.timeline`, their means over the phase, "
             "ms): parse (to the batcher), queue (waiting for the engine's worker), engine (its run up to the answer), "
             "handoff (back to the event loop), respond (the answer written); outside: what the clients' mean latency "
             "adds (loopback, uvicorn before the app, the clients). Batcher: the mean gathering window before a run, "
             "the mean run. Cores: CPU seconds per second of each server thread over the phase (/proc), the event "
             "loop's and the worker's sum last: near 1 the two Python threads, taking the GIL in turn, set the pace.",
             "Engine phases: the engine's host seconds in each phase of its runs as shares of the phase's wall time "
             "(check / tokenize / prepare / launch / read: a head batch's forward queued, then its answers read, "
             "where the device is waited for; `Engine.PHASES`), where measured.",
             "", "| run | device | event loop | phase | kind | requests/s | parse | queue | engine | handoff | respond | "
             "outside | gather / run ms | rows per run | cores: loop / worker / sum | engine phases |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for phase, ph in r["phases"].items():
            cores = ph.get("server_cores", {})
            batcher = ph.get("batcher") or {}
            for kind, k in ph["kinds"].items():
                stages = k.get("stages_ms")
                if not stages:
                    continue
                lines.append(
                    f"| {r.get('label') or '-'} | {r['device']} | {r.get('event_loop', 'not recorded')} | {phase} | "
                    f"{kind} | {k['requests_per_s']:,.0f} | "
                    + " | ".join(f"{stages[s]:.1f}" for s in STAGES)
                    + f" | {k['outside_server_ms']:.1f} | {batcher.get('gather_mean_ms', 0):.1f} / "
                    f"{batcher.get('run_mean_ms', 0):,.1f} | {ph['rows_per_run']:.1f} | "
                    f"{cores.get('event loop', 0):.2f} / {cores.get('batcher', 0):.2f} / "
                    f"{cores.get('python threads', 0):.2f} | "
                    + (" / ".join(f"{v:.2f}" for v in ph["engine_phases_share"].values())
                       if ph.get("engine_phases_share") else "-") + " |")
    return lines + ["", "Rerun: " + "; ".join(f"`{r['command']}`" for r in reports) + " (the switch interval set by a "
                    "`sitecustomize.py` that calls `sys.setswitchinterval` in the server).", ""]
