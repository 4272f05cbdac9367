"""Fair under mixed load (issue 20, item 4), through the real HTTP server on loopback: a
flood of long completions does not starve classify requests, and a flood of classify
requests does not starve completions. Each kind's latencies are measured alone and under
the other kind's flood; the figures are printed (``pytest -s``) for the closing note.

What starvation would look like, and what the assertions bound: a classify request that
waited for the running decode would wait for a whole long completion (its duration is
measured here too); a completion that waited for the classify queue to drain would wait
for ever under a flood that never drains. Timing bounds are kept wide (CI's 2 cores are
shared): they separate "answered between decode steps" from "waited for the other kind".
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import httpx
import pytest
import torch

from bench.harness.load import percentile
import softprompt as sp
from softprompt.serve import PromptBank, create_app
from softprompt.tasks import Verbalizer

from serving import Server
from test_serve_hardening import make_long_llama

LONG = 240  # tokens of a flooding completion


@pytest.fixture(scope="module")
def server(gpt2_tokenizer):
    tok = gpt2_tokenizer
    base = make_long_llama(tok).eval()
    bank = PromptBank(base, tok)
    torch.manual_seed(0)
    bank.add("review", sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text} It was [MASK]"),
                                          tokenizer=tok), task=Verbalizer({"neg": ["bad"], "pos": ["good"]}))
    bank.add("writer", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}",
                                                                   init_std=0.5), tokenizer=tok))
    with Server(create_app(bank, max_wait=0.005)) as running:
        yield running


def classify(client: httpx.Client) -> float:
    start = time.perf_counter()
    r = client.post("/v1/classify", json={"task": "review", "inputs": ["a gem of a film"]})
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


def complete(client: httpx.Client, tokens: int) -> float:
    start = time.perf_counter()
    r = client.post("/v1/completions", json={"model": "writer", "prompt": "once upon a time", "max_tokens": tokens,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == tokens  # random weights: no end of text met
    return time.perf_counter() - start


FLOOD = """
import json, sys, threading, time
import httpx
url, kind, clients, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
body = ({"task": "review", "inputs": ["a gem of a film"]} if kind == "classify" else
        {"model": "writer", "prompt": "once upon a time", "max_tokens": int(kind), "temperature": 0})
path = "/v1/classify" if kind == "classify" else "/v1/completions"
began, times, failed, measured = time.time(), [], [], threading.Event()
def wait_for_eof():  # the test closes our stdin when its measurement is done
    sys.stdin.read()
    measured.set()
threading.Thread(target=wait_for_eof, daemon=True).start()
def loop():
    with httpx.Client(base_url=url, timeout=120) as client:
        while not (measured.is_set() and time.time() >= began + seconds) and time.time() < began + 300:
            start = time.perf_counter()
            ok = client.post(path, json=body).status_code == 200
            (times if ok else failed).append(time.perf_counter() - start)
threads = [threading.Thread(target=loop) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"seconds": times, "failed": len(failed), "ended": time.time()}))
"""


class Flood:
    """`clients` threads in another process (the server's GIL is not theirs to take) sending
    one kind of request back to back for at least `seconds` and until the measurement ends
    (a slow measurement on a busy machine is still measured under the flood); the seconds
    of each."""

    def __init__(self, url: str, kind: str, clients: int, seconds: float):
        self.process = subprocess.Popen([sys.executable, "-c", FLOOD, url, kind, str(clients), str(seconds)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.seconds: list[float] = []

    def __enter__(self) -> "Flood":
        time.sleep(1.0)  # the flood is running before the measured requests start
        return self

    def __exit__(self, *exc) -> None:
        measured_until = time.time()
        out, _ = self.process.communicate(timeout=300)  # closes its stdin: the flood stops (or ran its seconds)
        report = json.loads(out)
        self.seconds = report["seconds"]
        assert report["failed"] == 0
        assert report["ended"] > measured_until  # the flood lasted the whole measurement


def p(values: list[float], q: int) -> float:
    """The q-th percentile (nearest rank)."""
    return percentile(values, q / 100)


def measured(url: str, send, n: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=120) as client:
        send(client)  # warm: the first request of a kind sets up its path
        return [send(client) for _ in range(n)]


def test_long_completions_do_not_starve_classify(server):
    alone = measured(server.url, classify, 40)
    with Flood(server.url, str(LONG), clients=8, seconds=8) as flood:
        under = measured(server.url, classify, 40)
    completion = statistics.median(flood.seconds)
    print(json.dumps({"classify_alone_p50_ms": 1e3 * p(alone, 50), "classify_alone_p99_ms": 1e3 * p(alone, 99),
                      "classify_under_completions_p50_ms": 1e3 * p(under, 50),
                      "classify_under_completions_p99_ms": 1e3 * p(under, 99),
                      f"completion_{LONG}_tokens_median_ms": 1e3 * completion, "completions_done": len(flood.seconds)}))
    assert len(flood.seconds) >= 16  # the flood ran
    # answered between decode steps, not after the running completions
    assert p(under, 99) < completion / 4, (p(under, 99), completion)


def test_a_classify_flood_does_not_starve_completions(server):
    alone = measured(server.url, lambda c: complete(c, 16), 12)
    with Flood(server.url, "classify", clients=8, seconds=6) as flood:
        under = measured(server.url, lambda c: complete(c, 16), 12)
    print(json.dumps({"completion_16_alone_p50_ms": 1e3 * p(alone, 50), "completion_16_alone_p99_ms": 1e3 * p(alone, 99),
                      "completion_16_under_classify_p50_ms": 1e3 * p(under, 50),
                      "completion_16_under_classify_p99_ms": 1e3 * p(under, 99),
                      "classify_done_meanwhile": len(flood.seconds),
                      "classify_under_flood_p50_ms": 1e3 * p(flood.seconds, 50)}))
    assert len(flood.seconds) >= 100  # the flood ran
    # The flood never drains: a completion that waited for it would not finish at all. What
    # it does cost: the server is one Python process whose event loop parses and answers the
    # flood (~500 classify requests/s on 2 cores) between the decode steps, and waiting heads
    # run one forward between two steps. Measured on 2 cores: 42 ms alone, 228 ms under the
    # flood at the median (5.5x): slower, not starved. The bound leaves room for CI's cores.
    assert p(under, 50) < 10 * p(alone, 50), (p(under, 50), p(alone, 50))
    assert p(under, 99) < 2.0, p(under, 99)
