"""The stages of a request in the server (`serve.timeline`), on /metrics: every request that
went through the engine is counted once per stage under its kind, each stage measured (a
stamp missing fails its request's count), and the stages add up to the request's time in
the server, which lies within the client's."""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from softprompt.serve import Request, create_app
from softprompt.serve.engine import PHASES
from softprompt.serve.timeline import STAGES, Timeline

from serving import Server
from test_serve_http import causal_bank, encoder_bank  # noqa: F401 (fixtures, found by pytest by their names)

#: how much later than its client the server may see a request end: the last bytes are sent
#: before the middleware reads its clock, and the client's thread may take the GIL between
SLACK = 2 * sys.getswitchinterval()


@pytest.fixture
def heads_bank(request):
    """A tiny BERT with two classifiers (``sentiment``, ``topic``) and a tagger (``ner``)."""
    return request.getfixturevalue("encoder_bank")


@pytest.fixture
def llama_bank(request):
    """A tiny Llama with a verbalizer (``review``) and a task for completions (``writer``)."""
    return request.getfixturevalue("causal_bank")


def stage_figures(metrics: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(kind, stage) -> (count, sum) of ``softprompt_request_stage_seconds``."""
    out: dict[tuple[str, str], list[float]] = {}
    for what, kind, stage, value in re.findall(
            r'softprompt_request_stage_seconds_(count|sum)\{kind="(\w+)",stage="(\w+)"\} (\S+)', metrics):
        out.setdefault((kind, stage), [0.0, 0.0])[what == "sum"] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def counted(client: httpx.Client, counts: dict[str, float]) -> str:
    """/metrics once every kind in `counts` has that many requests counted: a request is
    counted right after its last bytes are sent, which its client may have read already."""
    deadline = time.monotonic() + 10
    while True:
        metrics = client.get("/metrics").text
        figures = stage_figures(metrics)
        if all(figures.get((k, STAGES[-1]), (0.0,))[0] >= n for k, n in counts.items()) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.01)


def value(metrics: str, pattern: str) -> float:
    return float(re.search(pattern.replace("{", r"\{").replace("}", r"\}") + r" (\S+)", metrics).group(1))


def timed(client: httpx.Client, kind: str, path: str, body: dict, endpoint: str) -> None:
    """Send one request alone; its stages (differenced between two scrapes) are all
    measured, add up to its time in the server, and that lies within the client's."""
    before = client.get("/metrics").text
    start = time.perf_counter()
    if body.get("stream"):
        with client.stream("POST", path, json=body) as s:
            assert s.status_code == 200
            assert [line for line in s.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    else:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
    seen = time.perf_counter() - start
    was = stage_figures(before)
    after = counted(client, {kind: was.get((kind, STAGES[-1]), (0.0,))[0] + 1})
    now = stage_figures(after)
    stages = []
    for stage in STAGES:
        count, total = now[(kind, stage)]
        count0, total0 = was.get((kind, stage), (0.0, 0.0))
        assert count - count0 == 1, (kind, stage)
        stages.append(total - total0)
    assert all(s > 0 for s in stages), dict(zip(STAGES, stages))
    latency = f'softprompt_request_seconds_sum{{endpoint="{endpoint}"}}'
    in_server = value(after, latency) - (value(before, latency) if latency in before else 0.0)
    assert abs(sum(stages) - in_server) < 1e-6  # the stages cover the request's time in the server, once
    assert sum(stages) <= seen + SLACK, (dict(zip(STAGES, stages)), seen)


def test_head_requests_stages_are_counted_per_kind_and_add_up_within_the_clients_time(heads_bank):
    app = create_app(heads_bank, max_wait=0.004)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for text in ("a gem of a film", "bad"):
            timed(client, "classify", "/v1/classify", {"task": "sentiment", "inputs": [text]}, "/v1/classify")
        timed(client, "classify", "/v1/classify", {"task": "topic", "inputs": ["fine", "Paris in spring"]},
              "/v1/classify")  # two engine requests: followed through the one answered last
        timed(client, "tag", "/v1/tag", {"task": "ner", "inputs": ["Anna lives in Sarajevo"]}, "/v1/tag")

        def call(i: int) -> int:
            task, path = [("sentiment", "/v1/classify"), ("ner", "/v1/tag")][i % 2]
            return client.post(path, json={"task": task, "inputs": ["not my cup of tea"]}).status_code

        with ThreadPoolExecutor(8) as pool:  # concurrent: requests share runs, each still counted once
            assert list(pool.map(call, range(24))) == [200] * 24
        assert client.post("/v1/classify", json={"task": "nope", "inputs": ["x"]}).status_code == 404  # no engine
        metrics = counted(client, {"classify": 15, "tag": 13})
    figures = stage_figures(metrics)
    assert {k for k, _ in figures} == {"classify", "tag"}
    for stage in STAGES:
        assert figures[("classify", stage)][0] == 3 + 12 and figures[("tag", stage)][0] == 1 + 12
        assert figures[("classify", stage)][1] > 0 and figures[("tag", stage)][1] > 0
    runs = value(metrics, "softprompt_batch_rows_count")
    assert value(metrics, "softprompt_batch_gather_seconds_count") == runs  # no decode: every run was gathered
    assert value(metrics, "softprompt_batch_gather_seconds_sum") >= 0.99 * 0.004 * runs  # each waited its window
    # where the engine stage goes: every phase of a head run counted, all within the runs' time
    phases = {p: value(metrics, f'softprompt_engine_phase_seconds{{phase="{p}"}}') for p in PHASES}
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) <= value(metrics, "softprompt_batch_seconds_sum")
    # no CUDA graphs on a CPU (the metric says how many shapes were captured on a GPU)
    assert value(metrics, 'softprompt_cuda_graphs{kind="heads"}') == value(metrics, 'softprompt_cuda_graphs{kind="joins"}') == 0


def test_completions_streams_and_scores_have_their_own_kinds(llama_bank):
    with Server(create_app(llama_bank, max_wait=0.002)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        whole = {"model": "writer", "prompt": "a gem of a film", "max_tokens": 4, "temperature": 0}
        timed(client, "complete", "/v1/completions", whole, "/v1/completions")
        timed(client, "complete", "/v1/completions", {**whole, "stream": True}, "/v1/completions")
        timed(client, "score", "/v1/completions", {**whole, "max_tokens": 0, "echo": True, "logprobs": 1},
              "/v1/completions")
        timed(client, "classify", "/v1/classify", {"task": "review", "inputs": ["great"]}, "/v1/classify")
        metrics = counted(client, {"complete": 2, "score": 1, "classify": 1})
    figures = stage_figures(metrics)
    assert {k: int(figures[(k, "engine")][0]) for k, _ in figures} == {"complete": 2, "score": 1, "classify": 1}


def test_a_request_missing_a_stamp_has_no_stages():
    """What /metrics counts is what `Timeline.stages` gives: nothing for a request whose
    way is not stamped whole (the counts above then fall short)."""
    request = Request("t", "x")
    timeline = Timeline(1.0)
    timeline.follow("classify", [request])
    request.queued, request.taken, request.answered, timeline.delivered = 1.5, 2.0, 4.0, 4.5
    assert timeline.stages(5.0) == (0.5, 0.5, 2.0, 0.5, 0.5)
    for stamp in ("queued", "taken", "answered"):
        setattr(request, stamp, 0.0)
        assert timeline.stages(5.0) is None, stamp
        setattr(request, stamp, {"queued": 1.5, "taken": 2.0, "answered": 4.0}[stamp])
    timeline.delivered = 0.0
    assert timeline.stages(5.0) is None
    timeline.delivered = 4.5
    other = Request("t", "y", queued=1.5, taken=3.0, answered=4.25)  # answered last: the one followed
    for order in ([other, request], [request, other]):
        timeline.follow("classify", order)
        assert timeline.stages(5.0) == (0.5, 1.5, 1.25, 0.25, 0.5)
    other.answered = 0.0  # one of its requests unanswered: the request has no stages
    assert timeline.stages(5.0) is None
