"""`softprompt serve --tensor-parallel` (issue 22 item 3): a tiny Llama split over two CPU
processes (torchrun, gloo) serves an input prompt (its leading segment cached) and a deep
prompt, read lazily, one task in memory at a time; every answer equals the single-process
server's on the same folders, token for token: greedy, seeded sampling, stop strings, logit
biases, token-id prompts, several choices, sent concurrently so that rows join a running
decode. Both processes compute the input task's cached segment, at a message
(`prompt_cache.LockstepLeads`). A stream whose client goes mid-decode stops on both
processes at the same step (`lockstep.py`: cancellation latched at a message): the requests
after it still answer as the single process does. Stopping rank 0 stops the launch, every
process exiting 0. In one process, over a pipe: a follower mirrors rank 0 (cached segments
on both), and a run that raises on rank 0 ends on the follower too, which stays in step.
Also: requests as plain data and back (`wire.to_wire` / `from_wire`), and the options a
split base cannot serve, refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from softprompt.encode import TokenIds
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.serve import ErrorKind, GenerationOptions, Request, TokenStream
from softprompt.serve.wire import from_wire, pin_options, to_wire

from conftest import make_llama, save_served
from serving import free_port, wait_until_serving
from test_cli_train import invoke


# the server with the lockstep's log lines (INFO) on stderr
LOGGED = """import logging
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("softprompt.serve").setLevel(logging.INFO)
from softprompt.cli import main
main()
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory, gpt2_tokenizer):
    """The same base and prompt folders served split over two processes and by one, each
    task read on its first request and one at a time in memory (read again and again: on
    rank 0 when a request is submitted, on the other in its run)."""
    import softprompt as sp

    root = tmp_path_factory.mktemp("tp-serve")
    model = save_served(root, make_llama(gpt2_tokenizer), gpt2_tokenizer, {
        "input": sp.PromptTuningConfig(template="[P:2] {text}", init="vocab"),
        "deep": sp.PTuningV2Config(num_virtual_tokens=3, template="{text}", init_std=0.5)}, seed=1, model="llama")
    (root / "serve.py").write_text(LOGGED)
    serve = [str(root / "serve.py"), "serve", "--model", str(model), "--prompts", str(root / "prompts"), "--lazy",
             "--max-in-memory", "1"]
    launches = {"split": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *serve, "--tensor-parallel"],
                "one": [sys.executable, *serve]}
    running = {}
    try:
        for name, args in launches.items():
            port = free_port()
            log = open(root / f"{name}.log", "w")
            running[name] = (subprocess.Popen([*args, "--port", str(port)], stdout=log, stderr=log),
                             f"http://127.0.0.1:{port}", root / f"{name}.log")
        for process, url, log in running.values():  # the log read if the process exits first
            wait_until_serving(url, SimpleNamespace(poll=process.poll, stderr=log.open()), timeout=180)
        yield running
    finally:
        for process, _, _ in running.values():  # torchrun passes SIGTERM on to its processes (SIGKILL would not)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()


def _bodies(tokenizer) -> list[dict]:
    """Completions of both tasks: greedy and sampled (seeded), of different lengths (rows end
    and join at different steps), a stop string, a logit bias, a prompt of token ids, two choices."""
    ids = tokenizer("the film was long")["input_ids"]
    bodies = []
    for task in ("input", "deep"):
        bodies += [
            {"model": task, "prompt": "a gem of a film", "max_tokens": 12, "temperature": 0},
            {"model": task, "prompt": "bad", "max_tokens": 5, "temperature": 0},
            {"model": task, "prompt": "a gem of a film", "max_tokens": 9, "temperature": 0.7, "seed": 11},
            {"model": task, "prompt": "so so", "max_tokens": 7, "temperature": 1.0, "top_p": 0.8, "seed": 2**63},
            {"model": task, "prompt": "a gem of a film", "max_tokens": 12, "temperature": 0, "stop": [" the", "s"]},
            {"model": task, "prompt": ids, "max_tokens": 6, "temperature": 0, "logit_bias": {str(ids[0]): 5.0}},
            {"model": task, "prompt": "great", "max_tokens": 6, "temperature": 0.9, "seed": 5, "n": 2},
        ]
    return bodies


def _answers(url: str, bodies: list[dict]) -> list:
    def ask(body):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [(c["text"], c["finish_reason"]) for c in r.json()["choices"]], r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(ask, bodies))


def _rank_0(log) -> int:
    line = next(line for line in log.read_text().splitlines() if "split over 2 processes (rank 0: pid" in line)
    return int(line.split("(rank 0: pid ")[1].split(")")[0])


def test_a_split_base_answers_as_one_process_and_stops_cleanly(servers, gpt2_tokenizer):
    (split, split_url, split_log), (_, one_url, _) = servers["split"], servers["one"]
    bodies = _bodies(gpt2_tokenizer)
    want = _answers(one_url, bodies)
    assert len({texts[0][0] for texts, _ in want}) > 4  # the answers differ: equal ones would prove little
    assert _answers(split_url, bodies) == want
    for rank in (0, 1):  # the input task's cached segment, computed by both processes at a message
        assert f"rank {rank} cached the leading segment of 'input'" in split_log.read_text()

    # a stream whose client leaves mid-decode, beside a long completion decoding with it
    long = {"model": "deep", "prompt": "a gem of a film", "max_tokens": 40, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        beside = pool.submit(_answers, split_url, [long])
        with httpx.stream("POST", f"{split_url}/v1/completions", timeout=60,
                          json={"model": "input", "prompt": "a gem", "max_tokens": 40, "temperature": 0.8,
                                "seed": 3, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    break  # the client goes after its first piece
        assert beside.result(timeout=120) == _answers(one_url, [long])
    assert _answers(split_url, bodies[::-1]) == want[::-1]  # the processes are still in step

    assert split.poll() is None
    os.kill(_rank_0(split_log), signal.SIGTERM)  # as a process manager stops the server
    assert split.wait(timeout=60) == 0, split_log.read_text()[-3000:]  # torchrun: 0 when every process exits 0
    assert "exitcode" not in split_log.read_text()


def test_requests_reach_the_other_processes_as_they_are():
    """What rank 0 sends (`to_wire`, through JSON) is rebuilt as the same request: token ids
    stay token ids (not a list of words), fields stay fields, parsed options (stop strings,
    logit biases keyed by token id, 64-bit seeds) stay equal; options without a seed get one
    (`pin_options`); options rank 0 could not parse are refused on the others too."""
    options = GenerationOptions.parse({"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop": ["a", "b"],
                                       "seed": 2**64 - 1, "logit_bias": {"50": -2.5, "7": 1.0}, "logprobs": 2})
    requests = [
        Request("t", "a text", generate=True, options=options, stream=TokenStream(lambda text, logprobs: None)),
        Request("t", TokenIds([5, 6, 7]), generate=True, options=options, echo=True),
        Request("t", {"question": "why", "context": TokenIds([1, 2])}),
        Request("t", ["Anna", "lives", "in", "Paris"]),
    ]
    for i, request in enumerate(requests):
        request.options = pin_options(request.options)
        rid, back = from_wire(json.loads(json.dumps(to_wire(request, i))))
        assert rid == i
        assert (back.task, back.input, back.generate, back.echo, back.options) == \
            (request.task, request.input, request.generate, request.echo, request.options)
        assert type(back.input) is type(request.input) and (back.stream is None) == (request.stream is None)
    assert requests[2].input["context"] == TokenIds([1, 2]) and type(
        from_wire(json.loads(json.dumps(to_wire(requests[2], 0))))[1].input["context"]) is TokenIds
    assert requests[0].options.logit_bias == ((7, 1.0), (50, -2.5))

    for unsendable in (object(), {"text": float("nan")}, {1: "a"}):  # what JSON cannot carry as it is
        with pytest.raises(ConfigError):
            to_wire(Request("t", unsendable), 0)

    unseeded = pin_options({"temperature": 0.5})
    assert isinstance(unseeded, GenerationOptions) and unseeded.seed is not None
    bad = Request("t", "x", generate=True, options={"temperature": "hot"})
    bad.options = pin_options(bad.options)
    assert bad.options == {"temperature": "hot"}  # rank 0 answers its own error
    with pytest.raises(SoftPromptError):
        GenerationOptions.parse(from_wire(json.loads(json.dumps(to_wire(bad, 0))))[1].options)


def test_what_a_split_base_cannot_serve_is_refused_by_name(tmp_path, monkeypatch):
    (tmp_path / "prompts").mkdir()
    common = ["serve", "--model", tmp_path / "no-model", "--prompts", tmp_path / "prompts", "--tensor-parallel"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for options, message in [
        (["--admin"], "error: --tensor-parallel with --admin: a task added or removed would have to reach every"),
        (["--ray"], "error: --tensor-parallel with --ray"),
    ]:
        r = invoke(*common, *options)
        assert r.exit_code == 1 and message in r.output and "no-model" not in r.output, (options, r.output)
    monkeypatch.delenv("WORLD_SIZE")
    r = invoke(*common)
    assert r.exit_code == 1 and "error: --tensor-parallel splits the base over the processes of a distributed " \
        "launch: start with `torchrun --nproc_per_node N" in r.output, r.output


class _Silence(BaseException):
    """No message for 30 s: the follower thread ends (an Exception, the engine would catch)."""


class _Pipe:
    """`wire.Channel` within one process: rank 0's messages, through JSON, to a follower thread."""

    def __init__(self):
        import queue
        import threading

        self.messages: queue.Queue = queue.Queue()
        self.rank, self.size, self.sent = 0, 2, []
        self._votes: list[list[bool]] = []
        self._agreed: list[bool] = []
        self._lock = threading.Lock()
        self._both = threading.Barrier(2, action=self._combine, timeout=30)

    def send(self, message: dict) -> None:
        self.sent.append(message["kind"])
        self.messages.put(json.dumps(message))

    def receive(self) -> dict:
        import queue

        try:
            return json.loads(self.messages.get(timeout=30))
        except queue.Empty:
            raise _Silence() from None


    def any(self, flags: list[bool]) -> list[bool]:
        """`Channel.any` between rank 0's thread and the follower's: each waits for the other's flags."""
        with self._lock:
            self._votes.append(list(flags))
        self._both.wait()
        return self._agreed

    def _combine(self) -> None:  # once both voted, before either goes on
        self._agreed = [any(column) for column in zip(*self._votes)]
        self._votes.clear()


def _outcome(result) -> tuple:
    return result.output, result.error_kind, result.new_tokens, result.finish_reason


def _lockstep(tokenizer, folder, monkeypatch):
    """Rank 0's `LockstepEngine` and a follower (`follow`, in a thread) over an in-process
    channel, each on its own copy of the base, serving a deep task and an input task whose
    leading segment is cached (at messages: the banks compute none when they read a task,
    as under tensor parallelism). Returns (rank 0's engine, the follower's inner engine,
    the follower's results, the pipe, the follower's thread)."""
    import threading

    import softprompt as sp
    from softprompt.serve import Engine, PromptBank
    from softprompt.serve import lockstep

    torch.manual_seed(2)
    base = make_llama(tokenizer)
    sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}"),
                       tokenizer=tokenizer).save_pretrained(folder / "deep")
    sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:3] Review: {text}", init="vocab"),
                       tokenizer=tokenizer).save_pretrained(folder / "input")
    engines = []
    for _ in range(2):
        bank = PromptBank(make_llama(tokenizer), tokenizer, cache_prompts=False)
        for task in ("deep", "input"):
            bank.add(task, folder / task)
        engines.append(Engine(bank))
    followed: list = []  # the follower's results: of its runs, and of the rows it admitted
    run = engines[1].run
    engines[1].run = lambda requests, admit=None: followed.extend(run(requests, admit=admit)) or followed[-len(requests):]
    monkeypatch.setattr(lockstep, "_nowhere", followed.append)
    pipe = _Pipe()
    follower = threading.Thread(target=lockstep.follow, args=(engines[1], pipe), daemon=True)
    follower.start()
    return lockstep.LockstepEngine(engines[0], pipe), engines[1], followed, pipe, follower


def test_a_follower_runs_what_rank_0_runs_nested_runs_and_cancellations_included(gpt2_tokenizer, tmp_path, monkeypatch):
    """Rank 0 and a follower (`_lockstep`): rows admitted mid-decode, a run nested in the
    admit hook (as the batcher runs head requests there), a client that goes mid-decode (its
    row stops after the same step on both: the result counts the same tokens) and a sampled
    row without a seed (rank 0 fixes one: the follower draws the same tokens). The follower's
    every result equals rank 0's. The input task's leading segment is computed once on each
    process, at a message, and its rows start after it (the tensor on the device is the
    segment's keys and values). A request whose input is not plain data fails alone, sent to
    no one."""
    engine, other, followed, pipe, follower = _lockstep(gpt2_tokenizer, tmp_path, monkeypatch)
    greedy = Request("deep", "a gem of a film", generate=True, options={"max_new_tokens": 12})
    unseeded = Request("input", "so so", generate=True, options={"max_new_tokens": 8, "temperature": 0.8})
    joining = Request("deep", "bad", generate=True, options={"max_new_tokens": 6, "temperature": 0.7})
    nested = Request("deep", "great", generate=True, echo=True,
                     options=GenerationOptions(max_new_tokens=0, logprobs=1))  # a forward without a decode
    late = Request("input", "a long film", generate=True, options={"max_new_tokens": 5})  # joins: its lead is held
    answered, calls = [], []

    def admit(room: int):
        calls.append(room)
        if len(calls) == 2:
            return [(joining, answered.append)]
        if len(calls) == 3:
            answered.extend(engine.run([nested]))
            return [(late, answered.append)]
        if len(calls) == 4:
            greedy.cancelled.set()  # its client goes: latched at the next message, on both
        return []

    unsendable = Request("deep", object(), generate=True)  # fails alone, on rank 0, sent to no one
    results = engine.run([greedy, unsendable, unseeded], admit=admit)
    refused = results.pop(1)
    assert refused.error_kind is ErrorKind.BAD_INPUT and "a tensor-parallel server sends its inputs" in refused.error
    engine.stop()
    follower.join(timeout=60)
    assert not follower.is_alive()
    assert pipe.sent[:4] == ["run", "admitted", "admitted", "run"] and pipe.sent[-1] == "stop"
    assert results[0].error_kind is not None and 0 < results[0].new_tokens < 12  # stopped mid-decode
    assert results[1].ok and len(answered) == 3 and all(a.ok for a in answered)  # the nested run's and the joiners'
    assert [a.prompt_logprobs is not None for a in answered] == [True, False, False]
    mine = sorted(map(_outcome, results + answered), key=repr)
    assert sorted(map(_outcome, followed), key=repr) == mine
    assert engine.leads.computed == 1
    for bank in (engine.bank, other.bank):
        lead = bank["input"].lead
        assert lead is not None and lead.length == 5  # [P:3] Review: -> 3 virtual slots and 2 tokens
        assert bank["input"].on_device.shape == lead.kv.shape  # (L, 2, H_kv, 5, D_head): what the rows ran with


class _Injected(BaseException):
    """A failure no guard of the engine catches, as a bug escaping `Engine.run` would."""


def test_a_run_that_raises_on_rank_0_ends_on_the_follower_too(gpt2_tokenizer, tmp_path, monkeypatch):
    """Rank 0's decode raises after its second step (`_Injected`), in a run the `Batcher`
    made: its requests are answered with that error, as the single process answers them; the
    follower, waiting in the same decode for rank 0's next message, ends its run there
    (``failed``) and stays in step: the next requests answer on both alike."""
    from softprompt.serve import Batcher

    engine, other, followed, pipe, follower = _lockstep(gpt2_tokenizer, tmp_path, monkeypatch)
    decoder = engine.engine.decoder
    step, steps = decoder._step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 2:
            raise _Injected("rank 0's decode step failed")
        step()

    decoder._step = failing_step
    batcher = Batcher(engine)
    try:
        failed = batcher.submit([Request(task, "a gem of a film", generate=True, options={"max_new_tokens": 8})
                                 for task in ("input", "deep")])
        for future in failed:
            with pytest.raises(_Injected):
                future.result(timeout=60)
        assert pipe.sent[-1] == "failed"
        del decoder._step  # rank 0 decodes again
        after = [f.result(timeout=60) for f in batcher.submit(
            [Request(task, "so so", generate=True, options={"max_new_tokens": 6}) for task in ("input", "deep")])]
    finally:
        batcher.close()
        engine.stop()
        follower.join(timeout=60)
    assert not follower.is_alive() and pipe.sent[-1] == "stop"
    assert all(r.ok and r.new_tokens for r in after)
    assert sorted(map(_outcome, followed), key=repr) == sorted(map(_outcome, after), key=repr)  # the failed run: none


def test_a_lead_that_fails_on_one_process_is_left_out_on_every_one(gpt2_tokenizer, tmp_path, monkeypatch):
    """The input task's cached leading segment fails to compute on the follower alone: both
    processes leave it out (`Channel.any`), so both run its rows whole, in step, and the
    answers equal rank 0's and those of a bank that caches nothing."""
    import threading

    from softprompt.serve import Engine, PromptBank, prompt_cache

    compute_lead = prompt_cache.compute_lead
    where: dict[str, threading.Thread] = {}

    def failing_on_the_follower(model, n):
        if threading.current_thread() is where.get("follower"):
            raise RuntimeError("out of memory on rank 1 alone")
        return compute_lead(model, n)

    monkeypatch.setattr(prompt_cache, "compute_lead", failing_on_the_follower)
    engine, other, followed, pipe, follower = _lockstep(gpt2_tokenizer, tmp_path, monkeypatch)
    where["follower"] = follower
    requests = [Request("input", text, generate=True, options={"max_new_tokens": 6})
                for text in ("a gem of a film", "so so")]
    results = engine.run(requests)
    engine.stop()
    follower.join(timeout=60)
    assert not follower.is_alive()
    assert all(r.ok for r in results)
    assert sorted(map(_outcome, followed), key=repr) == sorted(map(_outcome, results), key=repr)
    assert engine.leads.computed == 0 and other.bank["input"].lead is None and engine.bank["input"].lead is None
    plain = PromptBank(make_llama(gpt2_tokenizer), gpt2_tokenizer, cache_prompts=False)
    plain.add("input", tmp_path / "input")
    alone = Engine(plain).run([Request("input", r.input, generate=True, options={"max_new_tokens": 6})
                               for r in requests])
    assert [_outcome(r) for r in alone] == [_outcome(r) for r in results]
