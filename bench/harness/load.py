"""The HTTP load generators and the server helpers they use (the load-and-faults benchmark
bench.serve.load, the HTTP throughput benchmark bench.serve.http and
tests/robustness/test_server_load.py import them from here).

`run_load`: N concurrent clients sending a seeded random mix of valid and bad requests for
T seconds while an admin loads and unloads prompts, every answer checked against the
answer to the same request alone.

The mix (`KINDS`, weights): classify on task A (1-3 inputs), tag on task B (NER), greedy
completions on task C, the same streamed, streamed with a client that hangs up after the
first chunk, classify and completions on two tasks that the admin repeatedly PUTs and
DELETEs (200 with the right answer and 404 are both right while they churn), and bad
requests: malformed JSON, a missing field, a bad input among good ones, a body over the
server's limit (declared by Content-Length, and sent chunked), too many inputs, too many
tokens asked for, an unknown task.

Correctness: before the load, every distinct valid request is sent alone (one at a time)
to the same server; under load its answer must equal that one: labels, tags, entities and
completion text exactly, scores within 1e-4, streamed chunks concatenated == the
non-streamed text with the same finish reason, the first chunk of a stream cut short a
prefix of it. A bad request must get its own status (400 / 422 / 413 / 404) and a body naming
the problem. A failure is any valid request not answered 200 with its alone answer, any
bad request not answered with its status, any connection error, timeout or 5xx, a /health
probe during the load not answered 200, or an admin PUT / DELETE refused. After the load
the server must answer /health, have no stream open (``softprompt_streams_open`` 0) and
an empty queue (polled with a timeout); its RSS is sampled throughout and reported.

Reported: requests served per kind (and per status), failures with the first examples,
p50 / p99 latency of valid requests (a stream: to its last chunk; a stream cut short: to
its first) and the slowest five, requests/s, the admin's loads and unloads, the server's
RSS (before, peak, after, and the peaks of each half of the load: growth shows as a
second half above the first).

The closed-loop throughput clients are in `bench.harness.closed_loop`; the server helpers
(a free port, waiting for /health, starting `softprompt serve`) in `bench.harness.server`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from bench.harness.server import free_port, metric, percentile, wait_healthy  # noqa: F401 (re-exported)

TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "fine", "not my cup of tea",
         "great fun for the whole family", "a dull , lifeless mess"]
SENTENCES = ["Anna lives in Sarajevo", "Paris is big", "I met Tom in Rome", "Microsoft opened an office in Berlin"]
PROMPTS = ["Once upon a time", "The weather today is", "def add(a, b):", "My favourite food is"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]

#: request kinds and their weights in the mix; VALID ones are compared with their alone answer
KINDS = {"classify": 6, "tag": 5, "complete": 4, "stream": 4, "disconnect": 2, "churn_classify": 3,
         "churn_complete": 2, "malformed_json": 1, "missing_field": 1, "bad_input": 1, "oversized": 1,
         "oversized_chunked": 1, "too_many_inputs": 1, "too_many_tokens": 1, "unknown_task": 1}
VALID = ("classify", "tag", "complete", "stream", "disconnect", "churn_classify", "churn_complete")
#: hostile requests (`Plan.hostile`), sent among the valid ones: each must get its own 4xx (or,
#: for `abandon`, nothing: its client leaves) and change no other request's answer. The
#: seeded sampled completions are valid requests whose answer must not depend on their batch.
HOSTILE = {"seeded_sample": 4, "unseeded_sample": 2, "surrogate_classify": 2, "surrogate_complete": 1,
           "surrogate_stream": 1, "huge_seed": 1, "tiny_temperature": 1, "nan_json": 1, "inf_json": 1,
           "abandon": 2}
HOSTILE_VALID = ("seeded_sample",)


@dataclass
class Plan:
    """What the load sends: the server's tasks, inputs and limits.

    Attributes:
        classify / tag / complete: tasks A (a classification head), B (NER), C (completions).
        churn_classify / churn_complete: tasks the admin loads and unloads during the load
            (a classification head; completions), from the folders in `churn_paths` (as the
            server sees them).
        max_tokens: completion lengths asked for; disconnect_tokens: a stream's, cut short
            (long enough that the client leaves while the row still decodes).
        max_body_bytes / max_inputs / max_new_tokens: the server's limits (the bad requests
            go just over them).
        churn_pause: the admin's pauses between loads and unloads, log-uniform in this range
            (seconds): short ones race requests in flight, long ones let requests that wait
            in the queue (seconds, on a real model under load) find their task still there.
        hostile: mix the `HOSTILE` kinds in, and let the admin also replace the churned
            classification task by folders of other kinds (`swap_paths`: a tagger, a
            completion prompt) while its requests are in flight.
    """

    classify: str = "sentiment"
    tag: str = "ner"
    complete: str = "writer"
    churn_classify: str = "extra"
    churn_complete: str = "extra_writer"
    churn_paths: dict[str, str] = field(default_factory=dict)
    texts: list[str] = field(default_factory=lambda: list(TEXTS))
    sentences: list[str] = field(default_factory=lambda: list(SENTENCES))
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    max_tokens: tuple[int, ...] = (4, 8)
    disconnect_tokens: int = 32
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256
    max_new_tokens: int = 1024
    churn_pause: tuple[float, float] = (0.02, 0.2)
    hostile: bool = False
    swap_paths: dict[str, str] = field(default_factory=dict)


# -- prompt folders -------------------------------------------------------------------
def save_prompts(base, tokenizer, folder: Path) -> Plan:
    """Five freshly initialised prompt folders on `base` under `folder` (one per task, as
    `softprompt serve --prompts` reads them) and the plan that uses them: ``sentiment``
    (P-tuning v2, a label-word verbalizer), ``ner`` (prompt tuning, a tag head), ``writer``
    (P-tuning with an MLP encoder, completions), and the churned ``extra`` (prefix tuning,
    a classification head) and ``extra_writer`` (prompt tuning, completions)."""
    import torch

    import softprompt as sp
    from softprompt.tasks import SequenceClassification, TokenClassification, Verbalizer
    from softprompt.folder import save_with_task

    folders = {
        "sentiment": (sp.PTuningV2Config(num_virtual_tokens=4, template="{text} It was [MASK]", init_std=0.5),
                      Verbalizer({"neg": ["bad"], "pos": ["good"]})),
        "ner": (sp.PromptTuningConfig(template="[P:3] {tokens}", init="random"), TokenClassification(TAGS)),
        "writer": (sp.PTuningConfig(template="[P:2] {text}", encoder="mlp", encoder_hidden_size=16), None),
        "extra": (sp.PrefixTuningConfig(num_virtual_tokens=3, template="Review: {text} [MASK]",
                                        projection_hidden_size=16),
                  SequenceClassification(["film", "food", "place"])),
        "extra_writer": (sp.PromptTuningConfig(template="[P:3] {text}", init="vocab"), None),
    }
    for i, (name, (config, task)) in enumerate(folders.items()):
        torch.manual_seed(100 + i)
        model = sp.SoftPromptModel(base, config, tokenizer=tokenizer)
        if task is None:
            model.save_pretrained(folder / name, save_trainable=False)
        else:
            task.bind(model)
            save_with_task(model, task, folder / name, {"note": "random init: for the load test"})
    return Plan(churn_paths={n: str(folder / n) for n in ("extra", "extra_writer")})


# -- the requests -----------------------------------------------------------------------
def catalogue(plan: Plan) -> dict[str, list[tuple[str, dict]]]:
    """The valid requests of each kind as (endpoint, body): a client picks one at random."""
    texts, sentences = plan.texts, plan.sentences
    classify = [[t] for t in texts] + [texts[i : i + 3] for i in range(0, len(texts) - 2, 2)]
    tag = [[s] for s in sentences] + [sentences[:2], sentences[1:4]]

    def completion(task: str, prompt: str, n: int) -> dict:
        return {"model": task, "prompt": prompt, "max_tokens": n, "temperature": 0}

    complete = [("/v1/completions", completion(plan.complete, p, n)) for p in plan.prompts for n in plan.max_tokens]
    return {
        "classify": [("/v1/classify", {"task": plan.classify, "inputs": x}) for x in classify],
        "tag": [("/v1/tag", {"task": plan.tag, "inputs": x}) for x in tag],
        "complete": complete,
        "stream": complete,
        "disconnect": [("/v1/completions", completion(plan.complete, p, plan.disconnect_tokens)) for p in plan.prompts],
        "churn_classify": [("/v1/classify", {"task": plan.churn_classify, "inputs": [t]}) for t in texts[:4]],
        "churn_complete": [("/v1/completions", completion(plan.churn_complete, p, plan.max_tokens[-1]))
                           for p in plan.prompts[:3]],
        **({"seeded_sample": [("/v1/completions", {**completion(plan.complete, p, plan.max_tokens[-1]),
                                                   "temperature": 0.9, "seed": seed})
                              for p in plan.prompts[:2] for seed in (7, 2**63 + 5)]} if plan.hostile else {}),
    }


def key(endpoint: str, body: dict) -> str:
    return endpoint + " " + json.dumps({k: v for k, v in body.items() if k != "stream"}, sort_keys=True)


def answer_of(endpoint: str, payload: dict) -> Any:
    """What a 200 answer says (ids and timestamps left out)."""
    if endpoint == "/v1/completions":
        choice = payload["choices"][0]
        return {"text": choice["text"], "finish_reason": choice["finish_reason"]}
    return payload["results"]


def differs(got: Any, want: Any) -> str | None:
    """Why `got` is not the alone answer `want` (None: it is): scores within 1e-4, the
    rest exactly."""
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{len(got) if isinstance(got, list) else got!r} results, alone {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            if "scores" in w:
                if g.get("label") != w["label"] or set(g.get("scores", {})) != set(w["scores"]):
                    return f"result {i}: {g} != alone {w}"
                worst = max(abs(g["scores"][k] - v) for k, v in w["scores"].items())
                if worst > 1e-4:
                    return f"result {i}: scores {g['scores']} differ from alone {w['scores']} by {worst:.2g}"
            elif g != w:
                return f"result {i}: {g} != alone {w}"
        return None
    return None if got == want else f"{got!r} != alone {want!r}"


def alone_answers(url: str, plan: Plan, timeout: float = 120) -> tuple[dict[str, Any], list[str]]:
    """Every valid request of the catalogue sent alone, one at a time: key -> answer; and
    the problems found (a completion whose stream, alone, differs from its plain answer)."""
    answers: dict[str, Any] = {}
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=timeout) as c:
        for kind, requests in catalogue(plan).items():
            for endpoint, body in requests:
                k = key(endpoint, body)
                if k in answers:
                    continue
                r = c.post(endpoint, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"alone, {endpoint} {body} answered {r.status_code}: {r.text[:300]}")
                answers[k] = answer_of(endpoint, r.json())
                if endpoint == "/v1/completions":
                    with c.stream("POST", endpoint, json={**body, "stream": True}) as s:
                        text, finish, error = _read_stream_sync(s)
                    got = {"text": text, "finish_reason": finish}
                    if error or got != answers[k]:
                        problems.append(f"alone stream of {body}: {error or got} != plain {answers[k]}")
    return answers, problems


def _parse_events(lines: list[str]) -> tuple[str, str | None, str | None]:
    """A completed stream's events -> (text, finish reason, problem)."""
    text, finish = "", None
    events = [line[6:] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return text, finish, f"the stream did not end with [DONE] (last: {events[-1:]})"
    for e in events[:-1]:
        payload = json.loads(e)
        if "error" in payload:
            return text, finish, f"error event: {payload['error']}"
        choice = payload["choices"][0]
        text += choice["text"]
        finish = choice["finish_reason"] or finish
    return text, finish, None


def _read_stream_sync(response: httpx.Response) -> tuple[str, str | None, str | None]:
    if response.status_code != 200:
        response.read()
        return "", None, f"status {response.status_code}: {response.text[:200]}"
    return _parse_events(list(response.iter_lines()))


# -- the load -----------------------------------------------------------------------------
@dataclass
class Tally:
    """Outcomes as they come in (one event loop: no lock needed)."""

    counts: dict[str, Counter] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0
    examples: list[dict] = field(default_factory=list)
    slowest: list[tuple[float, float, str]] = field(default_factory=list)  # (seconds, started at, kind)
    started: float = field(default_factory=time.perf_counter)

    def add(self, kind: str, status: int | str, problem: str | None, seconds: float, body: Any = None) -> None:
        c = self.counts.setdefault(kind, Counter())
        c["sent"] += 1
        c[f"status_{status}"] += 1
        if problem is None:
            c["ok"] += 1
            if kind in VALID + HOSTILE_VALID and status == 200:
                self.latencies.setdefault(kind, []).append(seconds)
                begun = time.perf_counter() - seconds - self.started
                self.slowest = sorted([*self.slowest, (seconds, begun, kind)], reverse=True)[:5]
            return
        c["failed"] += 1
        self.failures += 1
        if len(self.examples) < 20:
            shown = json.dumps(body)[:200] if body is not None else None
            self.examples.append({"kind": kind, "status": status, "problem": problem[:400], "request": shown})


async def _post_ascii(c: httpx.AsyncClient, endpoint: str, body: dict) -> httpx.Response:
    """POST `body` as ASCII JSON: a lone surrogate goes out as its escape (``"\\ud800"``),
    valid JSON that no UTF-8 encoder would write."""
    return await c.post(endpoint, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _expect(r: httpx.Response, status: int, words: str) -> str | None:
    """A bad request's answer: its status, and a body that names the problem."""
    if r.status_code != status:
        return f"expected {status}, got {r.status_code}: {r.text[:200]}"
    if words.lower() not in r.text.lower():
        return f"{status} without {words!r} in its body: {r.text[:200]}"
    return None


class Load:
    """One run of the load against a server (see the module docstring)."""

    def __init__(self, url: str, plan: Plan, answers: dict[str, Any], *, clients: int, seconds: float, seed: int,
                 timeout: float, rss: Callable[[], float | None]):
        self.url, self.plan, self.answers = url, plan, answers
        self.clients, self.seconds, self.seed, self.timeout, self.rss = clients, seconds, seed, timeout, rss
        self.catalogue = catalogue(plan)
        self.tally = Tally()
        self.admin = Counter()
        self.health_latencies: list[float] = []
        self.rss_samples: list[float] = []
        self.stop_at = 0.0

    async def run(self) -> float:
        self.stop_at = time.monotonic() + self.seconds
        start = self.tally.started = time.perf_counter()
        await asyncio.gather(*(self._client(k) for k in range(self.clients)), self._admin(), self._monitor())
        return time.perf_counter() - start

    async def _client(self, k: int) -> None:
        rng = random.Random(f"{self.seed}-{k}")
        mix = {**KINDS, **(HOSTILE if self.plan.hostile else {})}
        kinds, weights = list(mix), list(mix.values())
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits) as c:
            while time.monotonic() < self.stop_at:
                kind = rng.choices(kinds, weights)[0]
                start = time.perf_counter()
                body = None
                try:
                    status, problem, body = await getattr(self, "_" + kind)(c, rng)
                except httpx.HTTPError as e:  # connection refused or reset, timeout, protocol error
                    status, problem = "error", f"{type(e).__name__}: {e}"
                self.tally.add(kind, status, problem, time.perf_counter() - start, body)

    # valid requests: 200 and the alone answer ---------------------------------------------
    async def _valid(self, c: httpx.AsyncClient, rng: random.Random, kind: str, churning: bool = False):
        endpoint, body = rng.choice(self.catalogue[kind])
        r = await c.post(endpoint, json=body)
        if churning and r.status_code == 404:
            return 404, _expect(r, 404, "unknown task"), body
        if churning and r.status_code == 422 and self.plan.swap_paths and endpoint == "/v1/classify":
            return 422, _expect(r, 422, "classification"), body  # the task is another kind just now
        if r.status_code != 200:
            return r.status_code, f"status {r.status_code}: {r.text[:200]}", body
        return 200, differs(answer_of(endpoint, r.json()), self.answers[key(endpoint, body)]), body

    async def _classify(self, c, rng):
        return await self._valid(c, rng, "classify")

    async def _tag(self, c, rng):
        return await self._valid(c, rng, "tag")

    async def _complete(self, c, rng):
        return await self._valid(c, rng, "complete")

    async def _churn_classify(self, c, rng):
        return await self._valid(c, rng, "churn_classify", churning=True)

    async def _churn_complete(self, c, rng):
        return await self._valid(c, rng, "churn_complete", churning=True)

    async def _stream(self, c, rng):
        endpoint, body = rng.choice(self.catalogue["stream"])
        async with c.stream("POST", endpoint, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, f"status {r.status_code}: {r.text[:200]}", body
            text, finish, problem = _parse_events([line async for line in r.aiter_lines()])
        if problem:
            return 200, problem, body
        return 200, differs({"text": text, "finish_reason": finish}, self.answers[key(endpoint, body)]), body

    async def _disconnect(self, c, rng):
        endpoint, body = rng.choice(self.catalogue["disconnect"])
        want = self.answers[key(endpoint, body)]["text"]
        async with c.stream("POST", endpoint, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, f"status {r.status_code}: {r.text[:200]}", body
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk: leaving the block closes the connection
            else:
                return 200, "the stream ended without a chunk", body
        payload = json.loads(line[6:]) if line[6:] != "[DONE]" else {"choices": [{"text": ""}]}
        if "error" in payload:
            return 200, f"error event: {payload['error']}", body
        first = payload["choices"][0]["text"]
        return 200, None if want.startswith(first) else f"first chunk {first!r} does not start {want!r}", body

    # bad requests: their status, and a body naming the problem -------------------------------
    async def _malformed_json(self, c, rng):
        content = b'{"task": "%s", "inputs": [' % self.plan.classify.encode()
        r = await c.post("/v1/classify", content=content, headers={"content-type": "application/json"})
        return r.status_code, _expect(r, 400, "json"), None

    async def _missing_field(self, c, rng):
        body = {"task": self.plan.classify}
        r = await c.post("/v1/classify", json=body)
        return r.status_code, _expect(r, 400, "inputs"), body

    async def _bad_input(self, c, rng):
        body = {"task": self.plan.classify, "inputs": [rng.choice(self.plan.texts), {"no_such_field": "x"}]}
        r = await c.post("/v1/classify", json=body)
        return r.status_code, _expect(r, 422, "input 1:"), body

    def _oversized_body(self) -> bytes:
        filler = "x" * (self.plan.max_body_bytes + 1024)
        return json.dumps({"task": self.plan.classify, "inputs": [filler]}).encode()

    async def _oversized(self, c, rng):
        r = await c.post("/v1/classify", content=self._oversized_body(), headers={"content-type": "application/json"})
        return r.status_code, _expect(r, 413, "over the limit"), None

    async def _oversized_chunked(self, c, rng):
        data = self._oversized_body()

        async def pieces():  # no Content-Length: the server must count the bytes as they come
            for i in range(0, len(data), 1 << 16):
                yield data[i : i + (1 << 16)]

        r = await c.post("/v1/classify", content=pieces(), headers={"content-type": "application/json"})
        return r.status_code, _expect(r, 413, "over the limit"), None

    async def _too_many_inputs(self, c, rng):
        body = {"task": self.plan.classify, "inputs": ["fine"] * (self.plan.max_inputs + 1)}
        r = await c.post("/v1/classify", json=body)
        return r.status_code, _expect(r, 413, f"at most {self.plan.max_inputs}"), None

    async def _too_many_tokens(self, c, rng):
        body = {"model": self.plan.complete, "prompt": "x", "max_tokens": self.plan.max_new_tokens + 1}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, _expect(r, 400, "max_tokens"), body

    async def _unknown_task(self, c, rng):
        body = {"task": "no-such-task", "inputs": ["fine"]}
        r = await c.post("/v1/classify", json=body)
        return r.status_code, _expect(r, 404, "unknown task"), body

    # hostile requests (Plan.hostile) ----------------------------------------------------------
    async def _seeded_sample(self, c, rng):
        return await self._valid(c, rng, "seeded_sample")

    async def _unseeded_sample(self, c, rng):
        body = {"model": self.plan.complete, "prompt": rng.choice(self.plan.prompts), "max_tokens": 4,
                "temperature": 1.0}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, None if r.status_code == 200 else f"status {r.status_code}: {r.text[:200]}", body

    async def _surrogate_classify(self, c, rng):
        # a lone UTF-16 surrogate: valid JSON (an escape), not encodable text
        body = {"task": self.plan.classify, "inputs": [rng.choice(self.plan.texts), "\ud800 x"]}
        r = await _post_ascii(c, "/v1/classify", body)
        return r.status_code, _expect(r, 422, "surrogate"), None

    async def _surrogate_complete(self, c, rng):
        body = {"model": self.plan.complete, "prompt": "once \udfff upon", "max_tokens": 4, "temperature": 0}
        r = await _post_ascii(c, "/v1/completions", body)
        return r.status_code, _expect(r, 422, "surrogate"), None

    async def _surrogate_stream(self, c, rng):
        body = {"model": self.plan.complete, "prompt": "\ud83d", "max_tokens": 4, "stream": True}
        r = await _post_ascii(c, "/v1/completions", body)
        return r.status_code, _expect(r, 422, "surrogate"), None

    async def _huge_seed(self, c, rng):
        body = {"model": self.plan.complete, "prompt": rng.choice(self.plan.prompts), "max_tokens": 4,
                "temperature": 0.8, "seed": 2**70, "stream": rng.random() < 0.5}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, _expect(r, 400, "seed"), body

    async def _tiny_temperature(self, c, rng):
        body = {"model": self.plan.complete, "prompt": rng.choice(self.plan.prompts), "max_tokens": 4,
                "temperature": 1e-45, "stream": rng.random() < 0.5}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, _expect(r, 400, "temperature"), body

    async def _nan_json(self, c, rng):
        content = b'{"model": "%s", "prompt": "x", "temperature": NaN}' % self.plan.complete.encode()
        r = await c.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        return r.status_code, _expect(r, 400, "nan"), None

    async def _inf_json(self, c, rng):
        content = b'{"task": "%s", "inputs": ["fine"], "x": 1e400}' % self.plan.classify.encode()
        r = await c.post("/v1/classify", content=content, headers={"content-type": "application/json"})
        return r.status_code, _expect(r, 400, "1e400"), None

    async def _abandon(self, c, rng):
        """A non-streaming completion whose client leaves before the answer: the server must
        drop its work (checked after the load: the queue empties, decoding stops)."""
        body = {"model": self.plan.complete, "prompt": rng.choice(self.plan.prompts),
                "max_tokens": self.plan.disconnect_tokens, "temperature": 0}
        try:
            await c.post("/v1/completions", json=body, timeout=0.05)
        except httpx.TimeoutException:
            return "abandoned", None, body
        return 200, None, body  # answered within the time: nothing abandoned

    # the admin and the monitor ------------------------------------------------------------
    async def _admin(self) -> None:
        """Unload and load the churned tasks again and again (with random pauses, so that
        each is loaded about half the time); it ends with them loaded."""
        rng = random.Random(f"{self.seed}-admin")
        names = [self.plan.churn_classify, self.plan.churn_complete]
        lo, hi = (math.log(x) for x in self.plan.churn_pause)

        async def pause() -> None:  # pacing the churn, not waiting for anything
            await asyncio.sleep(min(math.exp(rng.uniform(lo, hi)), max(0.0, self.stop_at - time.monotonic())))

        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as c:
            while True:
                for name in names:
                    await self._admin_call(c, "DELETE", name)
                    await pause()
                for path in self.plan.swap_paths.values():  # the classification task becomes another kind
                    await self._admin_call(c, "PUT", names[0], path)
                    await pause()
                for name in names:  # loaded again even after the end: the server ends as it began
                    await self._admin_call(c, "PUT", name)
                    await pause()
                if time.monotonic() >= self.stop_at:
                    return

    async def _admin_call(self, c: httpx.AsyncClient, method: str, name: str, path: str | None = None) -> None:
        try:
            if method == "PUT":
                r = await c.put(f"/v1/prompts/{name}", json={"path": path or self.plan.churn_paths[name]})
            else:
                r = await c.delete(f"/v1/prompts/{name}")
            problem = None if r.status_code == 200 else f"{method} {name}: {r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            problem = f"{method} {name}: {type(e).__name__}: {e}"
        self.admin[method] += 1
        if problem:
            self.tally.add("admin", "error", problem, 0.0)

    async def _monitor(self) -> None:
        """/health every half second (it must answer 200 throughout), and the server's RSS."""
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as c:
            while time.monotonic() < self.stop_at:
                start = time.perf_counter()
                try:
                    r = await c.get("/health")
                    status, problem = r.status_code, None if r.status_code == 200 else f"/health: {r.text[:200]}"
                except httpx.HTTPError as e:
                    status, problem = "error", f"/health: {type(e).__name__}: {e}"
                self.health_latencies.append(time.perf_counter() - start)
                if problem:
                    self.tally.add("health", status, problem, 0.0)
                rss = self.rss()
                if rss is not None:
                    self.rss_samples.append(rss)
                await asyncio.sleep(0.5)


def rss_mib(pid: int | None = None) -> float | None:
    """A process's resident memory in MiB (Linux /proc; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_load(url: str, plan: Plan, *, clients: int = 64, seconds: float = 60, seed: int = 0, timeout: float = 120,
             pid: int | None = None, settle: float = 30) -> dict[str, Any]:
    """Load the server at `url` (with `--admin`, the plan's tasks loaded) and check every
    answer; returns the report (see the module docstring). `pid`: the server's process, for
    its RSS (default: this process, where the server runs in a thread)."""
    wait_healthy(url, 60)
    with httpx.Client(base_url=url, timeout=timeout) as c:
        for name, path in plan.churn_paths.items():  # loaded while the alone answers are taken
            r = c.put(f"/v1/prompts/{name}", json={"path": path})
            if r.status_code != 200:
                raise RuntimeError(f"PUT /v1/prompts/{name}: {r.status_code} {r.text[:300]} (start with --admin)")
    answers, alone_problems = alone_answers(url, plan, timeout)
    rss_before = rss_mib(pid)
    load = Load(url, plan, answers, clients=clients, seconds=seconds, seed=seed, timeout=timeout,
                rss=lambda: rss_mib(pid))
    wall = asyncio.run(load.run())
    tally = load.tally
    for problem in alone_problems:
        tally.add("alone", "mismatch", problem, 0.0)

    # afterwards: healthy, no stream left open, nothing waiting (disconnects settle asynchronously)
    after: dict[str, Any] = {}
    deadline = time.monotonic() + settle
    with httpx.Client(base_url=url, timeout=timeout) as c:
        while True:
            after["health"] = c.get("/health").status_code
            text = c.get("/metrics").text
            after["streams_open"] = metric(text, "softprompt_streams_open")
            after["queue_waiting"] = metric(text, "softprompt_queue_waiting")
            settled = after["health"] == 200 and after["streams_open"] == 0 and after["queue_waiting"] == 0
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        after["settled"] = settled
        after["tasks"] = [m["id"] for m in c.get("/v1/models").json()["data"]]
    if not settled:
        tally.add("after", "unsettled", f"after the load: {after}", 0.0)
    rss_after = rss_mib(pid)

    valid_kinds = VALID + (HOSTILE_VALID if plan.hostile else ())
    valid = [x for kind in valid_kinds for x in tally.latencies.get(kind, [])]
    sent = sum(c["sent"] for kind, c in tally.counts.items() if kind not in ("admin", "health", "alone", "after"))

    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 1)

    kinds = {}
    for kind in [*KINDS, *(HOSTILE if plan.hostile else ()), "admin", "health", "alone", "after"]:
        if kind in tally.counts:
            c = tally.counts[kind]
            kinds[kind] = {**dict(sorted(c.items())), "p50_ms": ms(percentile(tally.latencies.get(kind, []), 0.5)),
                           "p99_ms": ms(percentile(tally.latencies.get(kind, []), 0.99))}
    samples = load.rss_samples
    return {
        "clients": clients, "seconds": round(wall, 1), "seed": seed,
        "requests": sent, "valid_requests": sum(tally.counts.get(k, Counter())["sent"] for k in VALID),
        "failures": tally.failures, "failure_examples": tally.examples,
        "latency_p50_ms": ms(percentile(valid, 0.5)), "latency_p99_ms": ms(percentile(valid, 0.99)),
        "requests_per_s": round(sent / wall, 1), "valid_per_s": round(len(valid) / wall, 1),
        "kinds": kinds, "distinct_valid_requests": len(answers),
        "slowest": [{"kind": k, "ms": ms(s), "started_s": round(b, 2)} for s, b, k in tally.slowest],
        "admin": dict(load.admin), "health_p99_ms": ms(percentile(load.health_latencies, 0.99)),
        "after": after,
        "rss_mib": {"before": rss_before, "peak": max(samples, default=None), "after": rss_after,
                    "first_half_peak": max(samples[: len(samples) // 2], default=None),
                    "second_half_peak": max(samples[len(samples) // 2 :], default=None)},
    }
