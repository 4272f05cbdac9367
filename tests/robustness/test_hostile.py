"""Hostile clients beside innocent ones: every attack of issue 18, sent concurrently with
valid traffic, must get its own clear answer and change nothing for anyone else.

Two layers:

- **The real server** (`softprompt serve` in a subprocess on loopback, a tiny random Llama
  with five tasks): 32 clients for a few seconds mixing valid requests (classify, tag,
  greedy and seeded sampled completions, streams, clients that hang up) with hostile ones
  (lone surrogates in inputs and prompts, a 2**70 seed, temperature 1e-45, NaN and 1e400
  in JSON bodies, non-streaming clients that leave) while an admin deletes, reloads and
  swaps a task for folders of other kinds, and, beside them, hundreds of half-open
  connections and a client that sends its headers a byte at a time. Every valid request
  must get exactly the answer it gets alone; every hostile one its 4xx; and the server
  must stay healthy: /health answered quickly throughout, its file descriptors back to
  their count before the attack, its log bounded, its memory flat, and a SIGTERM with a
  stream still open and connections half-open must stop it within the drain bound.
- **The engine** (a property test): hypothesis draws batches mixing the same innocent
  requests with hostile ones (any text, surrogates included; any value of any type for
  inputs and options; unknown tasks and options) and one `Engine.run` takes them all:
  each innocent request's answer equals its answer alone, and no hostile request fails
  as a failure of the model (``ErrorKind.FAILED``): it is refused for what it is.

    python -m pytest -q tests/robustness/test_hostile.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bench.harness.load import differs, run_load, save_prompts
from softprompt.serve import Engine, PromptBank, Request
from softprompt.serve.request import ErrorKind

from conftest import make_llama
from serving import free_port, wait_until_serving

LOAD_SECONDS = 6
HALF_OPEN = 300  # connections that never finish their headers, held through the load
LOG_LIMIT = 256 * 1024  # bytes the server may write to its log through the whole attack
SHUTDOWN_LIMIT = 30.0  # seconds from SIGTERM to exit, a stream and half-open connections still open
SCALE = int(os.environ.get("PROPERTY_SCALE", "1"))  # examples of the property test: 40 x SCALE


# -- the real server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, gpt2_tokenizer):
    """`softprompt serve` on a tiny Llama saved as a model folder, the load's prompt folders,
    admin on; yields (url, process, plan, log path)."""
    root = tmp_path_factory.mktemp("hostile")
    base = make_llama(gpt2_tokenizer).eval()
    base.save_pretrained(root / "base")
    gpt2_tokenizer.save_pretrained(root / "base")
    plan = save_prompts(base, gpt2_tokenizer, root / "prompts")
    plan.max_body_bytes, plan.max_inputs, plan.max_new_tokens = 1 << 16, 16, 48
    plan.disconnect_tokens = 24  # the tiny Llama has 64 positions
    plan.hostile = True
    plan.swap_paths = {"ner": str(root / "prompts" / "ner"), "writer": str(root / "prompts" / "writer")}
    port = free_port()
    log = root / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "softprompt.cli", "serve", "--model", str(root / "base"), "--prompts",
             str(root / "prompts"), "--port", str(port), "--admin", "--device", "cpu",
             "--max-body-bytes", str(plan.max_body_bytes), "--max-inputs", str(plan.max_inputs),
             "--max-new-tokens", str(plan.max_new_tokens)],
            stdout=sink, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, _LogProcess(process, log))
        yield url, process, plan, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class _LogProcess:
    """`wait_until_serving` reads a dead server's stderr: here it went to the log file."""

    def __init__(self, process, log: Path):
        self.process, self.log = process, log

    def poll(self):
        return self.process.poll()

    @property
    def stderr(self):
        return self.log.open()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Attackers:
    """Connection-level attackers beside the load: `n` connections that send the start of
    a request's headers and then nothing, and one that sends its headers a byte every
    half second. `stop()` closes what the server has not closed, and reports how many of
    the half-open ones the server closed itself (its header timeout)."""

    def __init__(self, url: str, n: int):
        self.host, self.port = url.rsplit("//", 1)[1].split(":")
        self.port = int(self.port)
        self.n = n
        self.sockets: list[socket.socket] = []
        self.stopping = threading.Event()
        self.slow = threading.Thread(target=self._slow_headers, daemon=True)
        self.slow_closed_by_server = False

    def start(self) -> "Attackers":
        for _ in range(self.n):
            s = socket.create_connection((self.host, self.port), timeout=5)
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            self.sockets.append(s)
        self.slow.start()
        return self

    def _slow_headers(self) -> None:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            for byte in request:
                if self.stopping.wait(0.5):
                    return
                try:
                    s.sendall(bytes([byte]))
                except OSError:  # the server closed it: what a header timeout does
                    self.slow_closed_by_server = True
                    return

    def closed_by_server(self) -> int:
        """Half-open connections the server has closed (a read returns EOF or fails)."""
        closed = 0
        for s in self.sockets:
            s.setblocking(False)
            try:
                closed += s.recv(1024) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return closed

    def stop(self) -> int:
        self.stopping.set()
        closed = self.closed_by_server()
        for s in self.sockets:
            s.close()
        self.slow.join(5)
        return closed


def test_hostile_requests_beside_innocent_traffic_change_no_answer_and_keep_the_server_healthy(server):
    url, process, plan, log = server
    fds_before = open_fds(process.pid)
    attackers = Attackers(url, HALF_OPEN).start()
    try:
        report = run_load(url, plan, clients=32, seconds=LOAD_SECONDS, timeout=60, settle=30, pid=process.pid)
    finally:
        closed = attackers.stop()
    print(json.dumps({k: report[k] for k in ("requests", "failures", "latency_p50_ms", "latency_p99_ms",
                                             "health_p99_ms", "admin", "rss_mib", "after")}))
    assert report["failures"] == 0, json.dumps(report["failure_examples"], indent=1)
    kinds = report["kinds"]
    for kind in ("seeded_sample", "surrogate_classify", "huge_seed", "tiny_temperature", "nan_json", "inf_json"):
        assert kinds.get(kind, {}).get("sent", 0) >= 1, f"{kind} was never sent: lengthen the load"
        assert kinds[kind]["ok"] == kinds[kind]["sent"], kinds[kind]
    assert report["admin"]["PUT"] >= 4, report["admin"]  # the task was swapped between kinds under the load
    assert report["health_p99_ms"] < 1000, report["health_p99_ms"]
    # the half-open connections were closed by the server (header timeout), or by us: either
    # way the server's descriptors go back to their count before the attack
    deadline = time.monotonic() + 20
    while open_fds(process.pid) > fds_before + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds(process.pid) <= fds_before + 4, (fds_before, open_fds(process.pid), closed)
    rss = report["rss_mib"]
    assert rss["second_half_peak"] - rss["first_half_peak"] < 64, rss
    assert log.stat().st_size < LOG_LIMIT, log.read_text()[-2000:]
    # the engine works on: a classify request answers as it did alone
    r = httpx.post(f"{url}/v1/classify", json={"task": plan.classify, "inputs": [plan.texts[0]]}, timeout=30)
    assert r.status_code == 200, r.text


def test_the_server_idles_out_half_open_connections(server):
    """Connections whose headers never end are closed by the server (its header timeout),
    not held until the descriptors run out."""
    url, process, plan, log = server
    attackers = Attackers(url, 50).start()
    try:
        deadline = time.monotonic() + 60
        while attackers.closed_by_server() < 50 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert attackers.closed_by_server() == 50
    finally:
        attackers.stop()


def test_sigterm_stops_the_server_within_the_drain_bound_with_a_stream_open(server):
    url, process, plan, log = server
    port = int(url.rsplit(":", 1)[1])
    hung = socket.create_connection(("127.0.0.1", port), timeout=5)
    hung.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    body = json.dumps({"model": plan.complete, "prompt": "Once upon a time", "max_tokens": 40, "stream": True,
                       "temperature": 0}).encode()
    stream = socket.create_connection(("127.0.0.1", port), timeout=5)
    stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # and never read
    time.sleep(0.5)
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(SHUTDOWN_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still up {SHUTDOWN_LIMIT:.0f} s after SIGTERM: {log.read_text()[-2000:]}")
    finally:
        hung.close()
        stream.close()
    print(f"stopped {time.monotonic() - start:.1f} s after SIGTERM, exit status {process.returncode}")
    assert process.returncode in (0, -signal.SIGTERM)


# -- the engine: a property test --------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("hostile-engine")
    base = make_llama(gpt2_tokenizer).eval()
    plan = save_prompts(base, gpt2_tokenizer, root)
    bank = PromptBank.from_directory(base, gpt2_tokenizer, root)
    return Engine(bank, max_batch_rows=8), plan


def innocents(plan) -> list[Request]:
    return ([Request(plan.classify, t) for t in plan.texts[:3]]
            + [Request(plan.tag, s) for s in plan.sentences[:2]]
            + [Request(plan.complete, p, generate=True, options={"max_new_tokens": 4, "temperature": 0})
               for p in plan.prompts[:2]]
            + [Request(plan.complete, plan.prompts[0], generate=True,
                       options={"max_new_tokens": 4, "temperature": 0.9, "seed": 11}),
               Request(plan.complete, plan.prompts[1], generate=True,
                       options={"max_new_tokens": 4, "temperature": 0.7, "top_k": 5, "seed": 2**64 - 1})])


def copy(r: Request) -> Request:
    return Request(r.task, r.input, generate=r.generate, options=dict(r.options))


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.one_of(st.text(max_size=30), st.text(st.one_of(st.characters(), surrogates), max_size=12),
                  st.just("\ud800 x"), st.just(""), st.just("word " * 200))
values = st.one_of(texts, st.none(), st.booleans(), st.integers(-2**80, 2**80),
                   st.floats(allow_nan=True, allow_infinity=True), st.lists(texts, max_size=3),
                   st.dictionaries(st.sampled_from(["text", "tokens", "x", ""]), texts, max_size=2))
option_values = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80),
                          st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                          st.sampled_from([0, 1e-45, 1e-30, 5e-324, 2**64, 2**63, -1, 1e308, 0.5]), texts,
                          st.lists(texts, max_size=5))
options = st.dictionaries(st.sampled_from(["max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed",
                                           "stop", "eos_token_id", "bogus"]), option_values, max_size=4)


@st.composite
def hostile_requests(draw, plan):
    task = draw(st.sampled_from([plan.classify, plan.tag, plan.complete, "no-such-task", ""]))
    return Request(task, draw(values), generate=draw(st.booleans()), options=draw(options))


@settings(max_examples=40 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_hostile_requests_never_change_an_innocent_answer(engine, data):
    engine, plan = engine
    if not hasattr(engine, "_alone"):  # once per module: each innocent request alone
        engine._alone = [engine.run([copy(r)])[0] for r in innocents(plan)]
        assert all(r.ok for r in engine._alone), engine._alone
    alone = engine._alone
    hostile = data.draw(st.lists(hostile_requests(plan), min_size=1, max_size=6))
    order = data.draw(st.permutations(list(range(len(alone) + len(hostile)))))
    batch = [copy(r) for r in innocents(plan)] + hostile
    results = engine.run([batch[i] for i in order])
    by_index = {i: results[k] for k, i in enumerate(order)}
    for i, want in enumerate(alone):
        got = by_index[i]
        assert got.ok, f"innocent request {i} failed beside {hostile}: {got.error}"
        if isinstance(want.output, dict):
            assert differs([got.output], [want.output]) is None, (got.output, want.output)
        else:
            assert got.output == want.output, (i, got.output, want.output, hostile)
    for k, request in enumerate(hostile):
        got = by_index[len(alone) + k]
        assert got.ok or got.error_kind is not ErrorKind.FAILED, f"{request} failed inside the model: {got.error}"
