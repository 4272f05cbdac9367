"""The engine's time shared between decode steps and head forwards while rows decode
(issue 20 item 4; `serve/batcher.py`'s `TimeShare`).

On the GPU (H100, `bench.serve.http`'s mix phase) completions got 24 + 25 requests/s with
p50 ~610 ms while head requests took the rest: `Batcher._admit` answered every waiting head
request between any two decode steps, so each decode step waited for a head forward. Here a
fake engine on a fake clock decodes while head requests keep waiting, so the share each kind
gets is exact and the test cannot flake on a busy machine: a decode step costs STEP seconds,
a head forward HEAD seconds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from softprompt.serve.batcher import Batcher, TimeShare
from softprompt.serve.request import Request, Result

STEP, HEAD = 0.001, 0.004  # fake seconds: a decode step, a head forward


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeEngine:
    """Decodes one generation request for `steps` steps, asking `admit` between steps as the
    real decoder does; head requests (`generate=False`) cost HEAD per forward. Records when
    each head forward ran, in decode steps and in fake time."""

    max_batch_rows = 4

    def __init__(self, clock: Clock, steps: int, heads_queued: threading.Event):
        self.clock, self.steps, self.heads_queued = clock, steps, heads_queued
        self.decoding = threading.Event()
        self.head_forwards: list[tuple[int, float, int]] = []  # (step, time, rows)
        self.step = 0
        self.decode_seconds = self.head_seconds = 0.0

    def bind(self, request: Request) -> None:
        pass

    def generates(self, request: Request) -> bool:
        return request.generate

    def run(self, requests, admit=None) -> list[Result]:
        heads = [r for r in requests if not r.generate]
        if heads:  # one head forward
            self.clock.t += HEAD
            self.head_seconds += HEAD if self.decoding.is_set() else 0.0
            self.head_forwards.append((self.step if self.decoding.is_set() else -1, self.clock.t, len(heads)))
        if any(r.generate for r in requests):
            self.decoding.set()
            assert self.heads_queued.wait(10)
            for self.step in range(1, self.steps + 1):
                self.clock.t += STEP
                self.decode_seconds += STEP
                if admit is not None:
                    admit(0)  # the slots are full: heads only
            self.decoding.clear()
        return [Result(r.task, output="ok") for r in requests]


def run_mix(share: TimeShare, clock: Clock, steps: int = 400, heads: int = 2000) -> FakeEngine:
    queued = threading.Event()
    engine = FakeEngine(clock, steps, queued)
    batcher = Batcher(engine, max_queue=heads + 1, max_wait=0.0, time_share=share)
    try:
        generation = batcher.submit([Request("writer", "x", generate=True)])
        assert engine.decoding.wait(10)
        waiting = batcher.submit([Request("topic", str(i)) for i in range(heads)])
        queued.set()
        assert generation[0].result(30).output == "ok"
        assert all(f.result(30).output == "ok" for f in waiting)  # every head answered in the end
    finally:
        batcher.close()
    return engine


def test_heads_take_their_share_of_the_time_while_rows_decode():
    """Under a flood of head requests, with head_share 0.5, decode steps get half of the
    engine's time: a head forward (HEAD = 4 steps) runs about once every 4 decode steps,
    not after every step."""
    clock = Clock()
    engine = run_mix(TimeShare(head_share=0.5, max_head_wait=float("inf"), clock=clock), clock)
    during = [f for f in engine.head_forwards if f[0] >= 1]
    share = engine.head_seconds / (engine.head_seconds + engine.decode_seconds)
    assert 0.45 <= share <= 0.55, share
    gaps = [b[0] - a[0] for a, b in zip(during, during[1:])]
    assert min(gaps) >= 3 and max(gaps) <= 5, gaps


@pytest.mark.parametrize("head_share, expected", [(0.2, 0.2), (0.8, 0.8)])
def test_the_share_is_the_setting(head_share, expected):
    clock = Clock()
    engine = run_mix(TimeShare(head_share=head_share, max_head_wait=float("inf"), clock=clock), clock)
    share = engine.head_seconds / (engine.head_seconds + engine.decode_seconds)
    assert abs(share - expected) <= 0.05, share


def test_share_one_answers_heads_between_every_two_steps():
    """head_share 1: the behaviour before the time share (every decode step waits for a
    head forward while heads wait): 4 / 5 of the time goes to heads."""
    clock = Clock()
    engine = run_mix(TimeShare(head_share=1.0, clock=clock), clock)
    during = [f[0] for f in engine.head_forwards if f[0] >= 1]
    assert during == list(range(1, len(during) + 1))  # a head forward after each step
    share = engine.head_seconds / (engine.head_seconds + engine.decode_seconds)
    assert share == pytest.approx(HEAD / (HEAD + STEP), abs=0.01)


def test_a_head_that_waited_max_head_wait_runs_whatever_the_share():
    """head_share 0 would leave heads waiting for the whole decode; a head request that has
    waited max_head_wait runs anyway: here every head forward after the first comes once the
    oldest waiting head has waited 20 ms (fake), and no sooner than that."""
    clock = Clock()
    engine = run_mix(TimeShare(head_share=0.0, max_head_wait=0.02, clock=clock), clock, steps=200, heads=40)
    during = [f for f in engine.head_forwards if f[0] >= 1]
    assert during, "heads waited for the whole decode"
    first_step = during[0][0]
    assert first_step * STEP == pytest.approx(0.02, abs=STEP + 1e-9)  # not before the wait bound


def test_the_share_forgets_the_past_beyond_its_horizon():
    """Time counted long ago does not buy heads (or decode steps) a burst now: the counts
    decay to `horizon` seconds in all."""
    clock = Clock()
    share = TimeShare(head_share=0.5, horizon=1.0, clock=clock)
    share.start()
    clock.t = 10.0
    share.decoded()  # ten seconds of decoding with no head waiting
    assert share.decode + share.head == pytest.approx(1.0)
    share.ran_heads(0.4)
    assert share.decode + share.head == pytest.approx(1.0)
    assert share.heads_may_run(waited=0.0)  # 0.4 of head time against 0.6 of decoding, share 0.5


@pytest.mark.parametrize("bad", [{"head_share": -0.1}, {"head_share": 1.5}, {"max_head_wait": -1},
                                 {"horizon": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TimeShare(**bad)


def test_the_server_refuses_a_bad_share_naming_it(tmp_path):
    """create_app (and so `softprompt serve --head-share`) refuses a share outside [0, 1]
    with a ConfigError naming the setting."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from softprompt.errors import ConfigError
    from softprompt.serve import PromptBank, create_app

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(ConfigError, match="head_share"):
        create_app(PromptBank(base, None), head_share=2.0)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names in the OS are read from Linux's /proc")
def test_the_worker_thread_carries_its_name_in_the_os():
    """`top -H`, py-spy and the HTTP benchmark's per-thread CPU time tell the engine's worker
    from the event loop by the name the OS knows it by (cut to 15 characters)."""
    clock = Clock()
    engine = FakeEngine(clock, steps=0, heads_queued=threading.Event())
    batcher = Batcher(engine, time_share=TimeShare(clock=clock))
    try:
        for _ in range(100):  # the worker names itself as it starts
            comm = Path(f"/proc/self/task/{batcher._worker.native_id}/comm").read_text().strip()
            if comm != Path("/proc/self/comm").read_text().strip():
                break
            time.sleep(0.01)
        assert comm == "softprompt-batc"
    finally:
        batcher.close()
