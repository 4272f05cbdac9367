"""One request never hurts another (issue 18): a bad input fails alone before it joins a
batch; a row that fails while a batch runs or decodes fails alone (its neighbours' answers
and streams are what they are alone); a request is answered by the task version it was
admitted with, whatever an admin replaces or removes meanwhile; a request whose client has
gone stops at the next decode step; the batcher shuts down in bounded time."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import softprompt as sp
from softprompt import inject
from softprompt.encode import TemplateEncoder
from softprompt.serve import Batcher, Engine, ErrorKind, PromptBank, QueueFullError, Request, Result, TokenStream
from softprompt.serve import create_app
from softprompt.serve.decode import Decoder, DecodeRow, Sampling
from softprompt.serve.sampling import NonFiniteScoresError
from softprompt.serve.slots import DecodeSlots
from softprompt.tasks import Generation, SequenceClassification, TokenClassification, Verbalizer

from conftest import make_bert
from serving import Server

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "Anna lives in Sarajevo"]
SURROGATE = "\ud800 x"


def add(bank, name, config, task=None, seed=0, replace=False):
    torch.manual_seed(seed)
    model = sp.SoftPromptModel(bank.base, config, tokenizer=bank.tokenizer).eval()
    if task is not None:
        task.bind(model)
        task.eval()
    return bank.add(name, model, task=task, replace=replace)


@pytest.fixture
def encoder_bank(wordpiece_tokenizer):
    bank = PromptBank(make_bert(wordpiece_tokenizer).bert.eval(), wordpiece_tokenizer)
    add(bank, "sentiment", sp.PTuningV2Config(num_virtual_tokens=4, template="{text}", init_std=0.5),
        SequenceClassification(["neg", "pos"]), seed=0)
    add(bank, "topic", sp.PromptTuningConfig(template="[P:3] Topic: {text}", init="vocab"),
        SequenceClassification(["film", "food", "place"], pool="first"), seed=1)
    add(bank, "ner", sp.PrefixTuningConfig(num_virtual_tokens=2, template="{tokens}", projection_hidden_size=16),
        TokenClassification(TAGS), seed=2)
    return bank


def llama(tok, positions=128):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=positions)).eval()


@pytest.fixture
def causal_bank(gpt2_tokenizer):
    bank = PromptBank(llama(gpt2_tokenizer), gpt2_tokenizer)
    add(bank, "writer", sp.PTuningV2Config(num_virtual_tokens=3, template="{text}", init_std=0.5), seed=0)
    add(bank, "free", sp.PromptTuningConfig(template="[P:4] {text}"), seed=1)
    add(bank, "review", sp.PTuningConfig(template="[P:2] {text} It was [MASK]", encoder="mlp", encoder_hidden_size=16),
        Verbalizer({"neg": ["bad"], "pos": ["good"]}), seed=2)
    return bank


def completion(task, prompt, k=6, stream=None):
    return Request(task, prompt, generate=True, options={"max_new_tokens": k, "temperature": 0}, stream=stream)


def alone(bank, request):
    """The request's answer when it runs alone on a fresh engine."""
    fresh = Request(request.task, request.input, generate=request.generate, options=request.options)
    result = Engine(bank).run([fresh])[0]
    assert result.ok, result.error
    return result.output


class Late:
    """An admit hook that hands `requests` over at its third call (after the running rows'
    prefill and a decode step); `answers[i]` is request i's `Result`."""

    def __init__(self, requests: list[Request]):
        self.requests, self.calls = requests, 0
        self.answers: dict[int, Result] = {}

    def __call__(self, room: int):
        self.calls += 1
        if self.calls != 3:
            return []
        return [(r, lambda res, i=i: self.answers.__setitem__(i, res)) for i, r in enumerate(self.requests)]


class Pieces(TokenStream):
    """A stream that keeps its pieces (and can be told to raise at its n-th piece)."""

    def __init__(self, fail_at: int | None = None, then=None):
        self.pieces: list[str] = []
        self.fail_at, self.then = fail_at, then
        super().__init__(self.take)

    def take(self, text: str, logprobs=None) -> None:
        self.pieces.append(text)
        if self.then is not None and len(self.pieces) == 1:
            self.then()
        if self.fail_at is not None and len(self.pieces) >= self.fail_at:
            raise ConnectionResetError("the client's socket broke")


# -- 1. every input checked before it joins a batch -----------------------------------------
def test_bad_inputs_fail_alone_before_they_join_a_batch(encoder_bank):
    """A lone surrogate in any text (a string input, a field, a word of a word list) and
    inputs of the wrong type fail their own request with an error that names the field and
    the character; the requests batched with them get their answers."""
    good = [Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3]), Request("topic", {"text": TEXTS[2]})]
    bad = [Request("sentiment", SURROGATE), Request("topic", {"text": "ok " + SURROGATE}),
           Request("ner", {"tokens": ["Anna", "x\ud800"]}), Request("ner", "Anna \udfff"),
           Request("sentiment", {"text": 3}), Request("sentiment", {"text": None}),
           Request("ner", {"tokens": [["Anna"]]}), Request("sentiment", None), Request("sentiment", 2.5)]
    requests = good[:2] + bad + good[2:]
    results = Engine(encoder_bank).run(requests)
    expected = Engine(encoder_bank).run([Request(r.task, r.input) for r in good])
    assert [r.output for r in results[:2] + results[-1:]] == [r.output for r in expected]
    failed = results[2:-1]
    assert [r.error_kind for r in failed] == [ErrorKind.BAD_INPUT] * len(bad), [r.error for r in failed]
    assert "field 'text' is not valid Unicode (a lone surrogate, U+D800 at character 1)" in failed[0].error
    assert "'text'" in failed[1].error and "U+D800 at character 4" in failed[1].error
    assert "field 'tokens', word 1" in failed[2].error and "U+D800 at character 2" in failed[2].error
    assert "'tokens'" in failed[3].error and "U+DFFF at character 6" in failed[3].error
    assert "'text'" in failed[4].error and "int" in failed[4].error
    assert "'text'" in failed[5].error and "None" in failed[5].error
    assert "'tokens'" in failed[6].error and "word 0" in failed[6].error and "list" in failed[6].error
    assert "NoneType" in failed[7].error and "float" in failed[8].error


def test_a_failing_batched_tokenization_never_fails_the_run(encoder_bank, monkeypatch):
    """`prepare.pretokenized` only speeds encoding up: if it fails, rows encode one by one."""
    expected = Engine(encoder_bank).run([Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3])])

    def broken(self, texts):
        raise RuntimeError("the tokenizer's batch call broke")

    monkeypatch.setattr(TemplateEncoder, "memo_of", broken)
    results = Engine(encoder_bank).run([Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3])])
    assert [r.output for r in results] == [r.output for r in expected]


def test_a_batch_of_several_tasks_tokenizes_once_per_tokenizer(encoder_bank, monkeypatch):
    """Tasks on one base share its tokenizer: a run of three tasks' requests tokenizes their
    texts in one batched call (`TemplateEncoder.memo_of`) shared by the three encoders, and
    every answer equals its request run alone."""
    requests = [Request("sentiment", TEXTS[0]), Request("topic", TEXTS[1]), Request("ner", TEXTS[3]),
                Request("topic", TEXTS[2])]
    alone = [Engine(encoder_bank).run([r])[0].output for r in requests]
    calls = []
    memo_of = TemplateEncoder.memo_of

    def counted(self, texts):
        calls.append(list(texts))
        return memo_of(self, texts)

    monkeypatch.setattr(TemplateEncoder, "memo_of", counted)
    results = Engine(encoder_bank).run([Request(r.task, r.input) for r in requests])
    assert len({id(encoder_bank[t].model.encoder) for t in ("sentiment", "topic", "ner")}) == 3
    assert len(calls) == 1 and TEXTS[0] in calls[0] and TEXTS[1] in calls[0]
    assert [r.output for r in results] == alone


def test_a_surrogate_admitted_while_streams_decode_fails_alone(causal_bank):
    """A completion with a lone surrogate that joins a running decode fails alone: the
    streams decoding meanwhile get every piece of their alone-answers."""
    streams = [Pieces(), Pieces()]
    running = [completion("writer", TEXTS[0], 8, streams[0]), completion("free", TEXTS[1], 8, streams[1])]
    late = Late([completion("writer", SURROGATE), completion("free", TEXTS[2])])
    results = Engine(causal_bank).run(running, admit=late)
    answers = late.answers
    for request, result, stream in zip(running, results, streams):
        assert result.ok and result.output == alone(causal_bank, request) == "".join(stream.pieces)
    assert answers[0].error_kind is ErrorKind.BAD_INPUT and "U+D800 at character 1" in answers[0].error
    assert answers[1].output == alone(causal_bank, completion("free", TEXTS[2]))


def test_any_error_preparing_an_admitted_request_fails_it_alone(causal_bank, monkeypatch):
    encode = TemplateEncoder.encode

    def fragile(self, example, **kwargs):
        if "poison" in str(example):
            raise TypeError("a bug in encoding")
        return encode(self, example, **kwargs)

    monkeypatch.setattr(TemplateEncoder, "encode", fragile)
    stream = Pieces()
    running = completion("writer", TEXTS[0], 8, stream)
    late = Late([completion("free", "poison"), completion("free", TEXTS[1])])
    result = Engine(causal_bank).run([running], admit=late)[0]
    answers = late.answers
    assert result.output == alone(causal_bank, running) == "".join(stream.pieces)
    assert answers[0].error_kind is ErrorKind.FAILED and "a bug in encoding" in answers[0].error
    assert answers[1].output == alone(causal_bank, completion("free", TEXTS[1]))


def test_prompt_and_new_tokens_past_the_models_positions_are_refused(causal_bank):
    """The tiny Llama has 128 positions; the deep prompt of "writer" takes 3 of them."""
    engine = Engine(causal_bank)
    prompt = " ".join(["word"] * 40)
    n = len(causal_bank["writer"].model.encoder.encode({"text": prompt}).input_ids)
    fits = engine.run([completion("writer", prompt, 128 - 3 - n)])[0]
    assert fits.ok, fits.error
    over = engine.run([completion("writer", prompt, 128 - 3 - n + 1), completion("free", prompt, 200)])
    assert [r.error_kind for r in over] == [ErrorKind.INPUT_TOO_LONG] * 2
    assert f"{n + 3}" in over[0].error and f"{128 - 3 - n + 1}" in over[0].error and "128" in over[0].error


# -- 2. a row that fails while it decodes fails alone ------------------------------------
def test_a_stream_whose_callback_raises_fails_alone(causal_bank):
    streams = [Pieces(), Pieces(fail_at=2), Pieces()]
    requests = [completion("writer", TEXTS[0], 8, streams[0]), completion("free", TEXTS[1], 8, streams[1]),
                completion("writer", TEXTS[2], 8, streams[2]), Request("review", TEXTS[1])]
    results = Engine(causal_bank).run(requests)
    for i in (0, 2):
        assert results[i].ok and results[i].output == alone(causal_bank, requests[i]) == "".join(streams[i].pieces)
    assert results[1].error_kind is ErrorKind.FAILED and "the client's socket broke" in results[1].error
    assert len(streams[1].pieces) == 2  # stopped at the piece that raised
    assert results[3].output == alone(causal_bank, requests[3])


def test_a_joining_row_whose_prefill_fails_fails_alone(causal_bank, monkeypatch):
    """The prefill of a joining group fails on one row: the group is prefilled row by row,
    and the rows decoding already (streams) are untouched."""
    poison = causal_bank.tokenizer.encode(" zebra")[0]
    base_inputs = inject.base_inputs

    def fragile(base, spec, input_ids, *args, **kwargs):
        if (input_ids == poison).any():
            raise RuntimeError("a kernel failed on this row")
        return base_inputs(base, spec, input_ids, *args, **kwargs)

    monkeypatch.setattr(inject, "base_inputs", fragile)
    stream = Pieces()
    running = completion("writer", TEXTS[0], 10, stream)
    late = Late([completion("free", TEXTS[1]), completion("writer", "a zebra"), completion("free", TEXTS[2])])
    expected = [alone(causal_bank, running), alone(causal_bank, late.requests[0]), None,
                alone(causal_bank, late.requests[2])]
    result = Engine(causal_bank).run([running], admit=late)[0]
    answers = late.answers
    assert result.output == expected[0] == "".join(stream.pieces)
    assert answers[0].output == expected[1] and answers[2].output == expected[3]
    assert answers[1].error_kind is ErrorKind.FAILED and "a kernel failed on this row" in answers[1].error


def poison_logits(monkeypatch, decoder, victim):
    """Each decode step leaves NaN logits in the victim row's slot."""
    step = DecodeSlots.step

    def poisoned(slots):
        step(slots)
        for s, row in enumerate(decoder._rows):
            if row is victim:
                slots.logits[s] = float("nan")

    monkeypatch.setattr(DecodeSlots, "step", poisoned)


def test_a_row_with_non_finite_logits_fails_alone(causal_bank, monkeypatch):
    rows = [DecodeRow(name, {"text": text}, Sampling(max_new_tokens=6))
            for name, text in [("writer", TEXTS[0]), ("free", TEXTS[1]), ("writer", TEXTS[2])]]
    expected = [r.tokens for r in Decoder(causal_bank).run(
        [DecodeRow(r.task, r.example, r.sampling) for r in rows])]
    decoder = Decoder(causal_bank, max_rows=4)
    poison_logits(monkeypatch, decoder, rows[1])
    decoder.run(rows)
    assert rows[0].tokens == expected[0] and rows[2].tokens == expected[2]
    assert isinstance(rows[1].error, NonFiniteScoresError) and "not finite" in str(rows[1].error)
    assert rows[0].error is None and rows[2].error is None


@pytest.mark.parametrize("fixed", [False, True])
def test_a_step_that_fails_as_a_whole_fails_the_active_rows_not_the_waiting_ones(causal_bank, monkeypatch, fixed):
    """Two slots, four rows: the third step raises (which row cannot be told): the two
    rows in the slots fail with a clear error, the two waiting rows decode to their
    alone-answers, and the decoder serves the next run; with slots sized to the rows, and
    with fixed slots kept between runs (graph mode, stepped eagerly on the CPU)."""
    def rows():
        return [DecodeRow(name, {"text": text}, Sampling(max_new_tokens=5))
                for name, text in zip(["writer", "free", "writer", "free"], TEXTS)]

    expected = [r.tokens for r in Decoder(causal_bank).run(rows())]
    step = DecodeSlots.step
    count = [0]

    def failing(slots):
        count[0] += 1
        if count[0] == 3:
            raise RuntimeError("device error")
        step(slots)

    monkeypatch.setattr(DecodeSlots, "step", failing)
    decoder = Decoder(causal_bank, max_rows=2, graphs=fixed)
    first = decoder.run(rows())
    assert all("device error" in str(r.error) and "decode step failed" in str(r.error) for r in first[:2])
    assert [r.tokens for r in first[2:]] == expected[2:] and first[2].error is None and first[3].error is None
    again = decoder.run(rows())
    assert [r.tokens for r in again] == expected and all(r.error is None for r in again)


# -- 3. the task version a request was admitted with -----------------------------------------
def test_a_request_keeps_the_task_version_it_was_admitted_with(encoder_bank):
    """A NER task replaced by a classifier (and a classifier removed) after its requests were
    admitted: they are answered by the old heads, never by the new one."""
    bank = encoder_bank
    engine = Engine(bank)
    expected = engine.run([Request("ner", TEXTS[3]), Request("topic", TEXTS[0])])
    tags, topic = engine.run([Request("ner", TEXTS[3]), Request("topic", TEXTS[0])])
    assert tags.output == expected[0].output and isinstance(tags.output, list)
    admitted = [Request("ner", TEXTS[3], entry=bank["ner"]), Request("topic", TEXTS[0], entry=bank["topic"])]
    add(bank, "ner", sp.PromptTuningConfig(template="[P:2] {tokens}"), SequenceClassification(["x", "y"]),
        replace=True)
    bank.remove("topic")
    results = engine.run(admitted)
    assert [r.output for r in results] == [e.output for e in expected]
    assert isinstance(engine.run([Request("ner", TEXTS[3])])[0].output, dict)  # new requests: the new head


def test_a_task_replaced_mid_run_by_another_kind_answers_its_admitted_requests_with_the_old_head(causal_bank):
    """Through the batcher: while a completion decodes, a classification request and a
    completion are submitted, then the classifier's task is replaced by a generating task
    and the completion's task removed (from the stream's callback, on the engine's thread,
    so before the requests are taken): the first is answered by the verbalizer it was
    admitted with, not with generated text, and the second joins the decode and finishes
    on its old prompt."""
    bank = causal_bank
    expected = Engine(bank).run([Request("review", TEXTS[1])])[0].output
    completed = alone(bank, completion("free", TEXTS[2]))
    batcher = Batcher(Engine(bank), max_wait=0)
    label = []

    def submit_then_swap():
        label.extend(batcher.submit([Request("review", TEXTS[1]), completion("free", TEXTS[2])]))
        add(bank, "review", sp.PTuningV2Config(num_virtual_tokens=2, template="{text}"), Generation(max_new_tokens=3),
            replace=True)
        bank.remove("free")

    try:
        long = batcher.submit([completion("writer", TEXTS[0], 40, Pieces(then=submit_then_swap))])[0]
        assert long.result(timeout=60).ok
        assert label[0].result(timeout=60).output == expected
        assert label[1].result(timeout=60).output == completed
        assert isinstance(batcher.submit([Request("review", TEXTS[1])])[0].result(timeout=60).output, str)
    finally:
        batcher.close()


# -- 4. cancelled requests -------------------------------------------------------------------
def test_cancelled_requests_stop_decoding_within_a_few_steps(gpt2_tokenizer, monkeypatch):
    bank = PromptBank(llama(gpt2_tokenizer, positions=512), gpt2_tokenizer)
    add(bank, "writer", sp.PTuningV2Config(num_virtual_tokens=3, template="{text}", init_std=0.5))
    requests = [Request("writer", f"{TEXTS[i % 4]} {i}", generate=True,
                        options={"max_new_tokens": 200, "temperature": 0}) for i in range(16)]
    steps = [0]
    step = DecodeSlots.step

    def counted(slots):
        steps[0] += 1
        step(slots)

    def admit(room):
        if steps[0] == 3:
            for r in requests:
                r.cancelled.set()
        return []

    monkeypatch.setattr(DecodeSlots, "step", counted)
    results = Engine(bank).run(requests, admit=admit)
    assert steps[0] <= 4
    assert all(r.error_kind is ErrorKind.CANCELLED for r in results), [r.error for r in results]


def test_a_cancelled_stream_stops_like_a_cancelled_request(causal_bank):
    streams = [Pieces(then=lambda: streams[0].cancel()), Pieces()]
    requests = [completion("writer", TEXTS[0], 30, streams[0]), completion("free", TEXTS[1], 8, streams[1])]
    results = Engine(causal_bank).run(requests)
    assert requests[0].gone and results[0].error_kind is ErrorKind.CANCELLED and len(streams[0].pieces) == 1
    assert results[1].output == alone(causal_bank, requests[1])


def wait_for(condition) -> None:
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the worker never took the request")


class Held(Engine):
    """An engine whose runs wait until released (or forever): what it was given is kept."""

    def __init__(self, bank):
        super().__init__(bank)
        self.release = threading.Event()
        self.seen: list[Request] = []

    def run(self, requests, admit=None):
        self.seen += requests
        self.release.wait()
        return [Result(r.task, output="ok") for r in requests]


def test_the_batcher_drops_cancelled_waiting_requests(encoder_bank):
    engine = Held(encoder_bank)
    batcher = Batcher(engine, max_wait=0)
    try:
        first = batcher.submit([Request("sentiment", "a")])[0]
        wait_for(lambda: engine.seen)
        gone, kept = Request("sentiment", "b"), Request("sentiment", "c")
        futures = batcher.submit([gone, kept])
        gone.cancelled.set()
        engine.release.set()
        assert futures[0].result(timeout=30).error_kind is ErrorKind.CANCELLED
        assert futures[1].result(timeout=30).output == "ok" and first.result(timeout=30).output == "ok"
        assert gone not in engine.seen and kept in engine.seen
    finally:
        batcher.close()


def test_close_returns_even_when_the_engine_hangs(encoder_bank):
    """close(timeout) cancels the requests in flight and waiting, waits at most `timeout`
    for the worker, and answers every request still open."""
    engine = Held(encoder_bank)
    batcher = Batcher(engine, max_wait=0)
    running = Request("sentiment", "a")
    futures = batcher.submit([running])
    wait_for(lambda: engine.seen)
    waiting = Request("sentiment", "b")
    futures += batcher.submit([waiting])
    closing = threading.Thread(target=batcher.close, kwargs={"timeout": 0.2})
    closing.start()
    closing.join(timeout=60)
    try:
        assert not closing.is_alive()
        assert running.cancelled.is_set() and waiting.cancelled.is_set()
        for f in futures:
            assert f.result(timeout=0).error_kind is ErrorKind.SHUTTING_DOWN
        with pytest.raises(QueueFullError, match="shutting down"):
            batcher.submit([Request("sentiment", "c")])
    finally:
        engine.release.set()


# -- 5. more inputs than the queue can ever hold -----------------------------------------------
def test_more_inputs_than_the_queue_holds_is_a_distinct_error(encoder_bank):
    from softprompt.serve import TooManyRequestsForQueueError

    engine = Held(encoder_bank)
    engine.release.set()
    batcher = Batcher(engine, max_queue=2, max_wait=0)
    try:
        with pytest.raises(TooManyRequestsForQueueError, match="3 inputs .* at most 2"):
            batcher.submit([Request("sentiment", t) for t in "abc"])
        assert not isinstance(TooManyRequestsForQueueError("x"), QueueFullError)
    finally:
        batcher.close()
    with Server(create_app(encoder_bank, max_queue=2)) as server, httpx.Client(base_url=server.url) as client:
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["a", "b", "c"]})
        assert r.status_code == 413 and "at most 2" in r.json()["error"]["message"]
