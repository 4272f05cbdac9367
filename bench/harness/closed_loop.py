"""Closed-loop throughput clients (`bench.serve.http`): N clients in several processes,
each sending one request of its kind at a time (classify, tag, a streamed completion, a
chat completion) for a fixed time; per kind, every latency, the streams' times to the first
token, tokens generated, failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import httpx


#: what the throughput clients send, in turn
CLOSED_LOOP_TEXTS = ["a gem of a film", "Anna flew to Paris with Lufthansa",
                     "the plot wanders but the cast holds it together", "a dull , lifeless mess",
                     "Microsoft opened an office in Berlin", "great fun for the whole family"]
#: request kinds of the closed loop: head requests, and completions (streamed: time to the
#: first token) and chat (not streamed), `CLOSED_LOOP_TOKENS` tokens each
HEAD_KINDS, GENERATION_KINDS = ("classify", "tag"), ("complete", "chat")
CLOSED_LOOP_TOKENS = 16


def kinds_of(models: list[dict]) -> dict[str, list[str]]:
    """The served tasks (`/v1/models` entries) by the kind of request they answer: ``tag``
    (NER heads), ``classify`` (other heads), ``complete`` and ``chat`` (tasks without a head;
    the base model alone is left out: its rows would be the only ones without a prompt)."""
    kinds: dict[str, list[str]] = {k: [] for k in HEAD_KINDS + GENERATION_KINDS}
    for m in models:
        if m.get("kind") == "base":
            continue
        if m["task"] == "ner":
            kinds["tag"].append(m["id"])
        elif m["task"] in (None, "generation"):
            kinds["complete"].append(m["id"])
            kinds["chat"].append(m["id"])
        else:
            kinds["classify"].append(m["id"])
    return {k: v for k, v in kinds.items() if v}


def _body(kind: str, task: str, text: str) -> tuple[str, dict]:
    if kind in HEAD_KINDS:
        return f"/v1/{kind}", {"task": task, "inputs": [text]}
    if kind == "complete":
        return "/v1/completions", {"model": task, "prompt": text, "max_tokens": CLOSED_LOOP_TOKENS, "temperature": 0,
                                   "stream": True, "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", {"model": task, "messages": [{"role": "user", "content": text}],
                                    "max_tokens": CLOSED_LOOP_TOKENS, "temperature": 0}


def rows_of(body: dict) -> int:
    """The rows a request body asks for: its inputs, or its prompts (a list of prompts:
    strings, or lists of token ids), else one."""
    if "inputs" in body:
        return len(body["inputs"])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


async def _one(c: httpx.AsyncClient, endpoint: str, body: dict) -> tuple[int, float, float | None, int]:
    """One request: (status, seconds to the whole answer, seconds to the first token of a
    stream (None: not streamed), tokens generated)."""
    start = time.perf_counter()
    if not body.get("stream"):
        r = await c.post(endpoint, json=body)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return r.status_code, time.perf_counter() - start, None, tokens
    first, tokens = None, 0
    async with c.stream("POST", endpoint, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, time.perf_counter() - start, None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices") and event["choices"][0].get("text"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return r.status_code, time.perf_counter() - start, first, tokens


def _client_process(url: str, plan: list[tuple[str, str]], seconds: float, out,
                    bodies: dict[str, list[tuple[str, dict]]] | None = None) -> None:
    """One process of the load: a client per (kind, task) of `plan`, each sending one
    request at a time for `seconds` (`bodies`: per kind, the (endpoint, body) pairs its
    clients send in turn, instead of `_body`'s); puts its records in `out`."""
    async def run() -> dict[str, Any]:
        records: dict[str, dict[str, list]] = {}
        stop_at = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=len(plan))
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            async def client(k: int, kind: str, task: str) -> None:
                mine = records.setdefault(kind, {"latency": [], "ttft": [], "tokens": [], "rows": [], "failures": []})
                i = k
                while time.perf_counter() < stop_at:
                    endpoint, body = (bodies[kind][i % len(bodies[kind])] if bodies else
                                      _body(kind, task, CLOSED_LOOP_TEXTS[i % len(CLOSED_LOOP_TEXTS)]))
                    try:
                        status, seconds_, first, tokens = await _one(c, endpoint, body)
                    except httpx.HTTPError as e:
                        status, seconds_, first, tokens = type(e).__name__, 0.0, None, 0
                    if status == 200:
                        mine["latency"].append(seconds_)
                        mine["tokens"].append(tokens)
                        mine["rows"].append(rows_of(body))
                        if first is not None:
                            mine["ttft"].append(first)
                    else:
                        mine["failures"].append(str(status))
                    i += 1

            await asyncio.gather(*(client(k, kind, task) for k, (kind, task) in enumerate(plan)))
        return {"records": records, "wall": time.perf_counter() - started}

    out.put(asyncio.run(run()))


def closed_loop(url: str, *, clients: int, seconds: float, kinds: tuple[str, ...] | None = None,
                processes: int = 1, bodies: dict[str, list[tuple[str, dict]]] | None = None) -> dict[str, Any]:
    """`clients` clients, each sending one request at a time (one input) to the server at
    `url` for `seconds` and waiting for its answer. Client k sends requests of one kind
    (`kinds_of` the served tasks, limited to `kinds`; the kinds in turn over the clients)
    and of one task of that kind (in turn). The clients run in `processes` processes
    (asyncio, httpx), so that the load generator does not set the pace. `bodies`: the
    requests of each kind, (endpoint, body) pairs each client of the kind sends in turn
    (its own kinds, spread over the clients as the served ones are), instead of the
    served tasks' closed-loop requests.

    Returns:
        ``tasks`` (kind -> ids), ``wall`` (seconds), ``kinds``: per kind, ``clients``,
        ``latency`` (seconds of every 200 answer), ``ttft`` (streams: seconds to the first
        token), ``tokens`` (generated per answer), ``rows`` (per answer: `rows_of`),
        ``failures`` (status -> count).
    """
    import multiprocessing

    served = ({kind: [""] for kind in bodies} if bodies else kinds_of(httpx.get(f"{url}/v1/models").json()["data"]))
    names = [k for k in served if kinds is None or k in kinds]
    if not names:
        raise ValueError(f"no served task answers {kinds}; served: {served}")
    plan = [(names[k % len(names)], served[names[k % len(names)]][(k // len(names)) % len(served[names[k % len(names)]])])
            for k in range(clients)]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_client_process, args=(url, plan[p::processes], seconds, out, bodies))
             for p in range(processes)]
    for p in procs:
        p.start()
    answers = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(a["wall"] for a in answers)  # from each process's first request (not its start-up)
    parts = [a["records"] for a in answers]
    merged: dict[str, Any] = {}
    for kind in names:
        lists = [part.get(kind, {}) for part in parts]
        failures = Counter(f for x in lists for f in x.get("failures", []))
        merged[kind] = {"clients": sum(1 for k, _ in plan if k == kind),
                        **{key: [v for x in lists for v in x.get(key, [])] for key in ("latency", "ttft", "tokens", "rows")},
                        "failures": dict(failures)}
    return {"tasks": {k: served[k] for k in names}, "wall": wall, "kinds": merged}
