"""The HTTP server, run for real by uvicorn on 127.0.0.1 in a thread: interleaved concurrent
requests of several tasks get the answers each task gives alone; errors get their status
and name the problem; streams and disconnects; admin and API-key checks."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import softprompt as sp
from softprompt.folder import save_with_task
from softprompt.serve import Batcher, Engine, PromptBank, QueueFullError, Request, Result, TokenStream, create_app
from softprompt.tasks import SequenceClassification, TokenClassification, Verbalizer

from conftest import make_bert, make_llama
from serving import Server

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "Anna lives in Sarajevo",
         "fine", "not my cup of tea", "Paris in spring"]


def alone(entry, example):
    batch, _ = entry.task.collate(entry.model, [example], with_targets=False)
    with torch.no_grad():
        return entry.task.predict(entry.model, batch)[0]


@pytest.fixture
def encoder_bank(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    base = make_bert(tok).bert.eval()
    bank = PromptBank(base, tok)
    for i, (name, config, task) in enumerate([
        ("sentiment", sp.PTuningV2Config(num_virtual_tokens=4, template="{text}", init_std=0.5),
         SequenceClassification(["neg", "pos"])),
        ("topic", sp.PromptTuningConfig(template="[P:3] Topic: {text}", init="vocab"),
         SequenceClassification(["film", "food", "place"], pool="first")),
        ("ner", sp.PrefixTuningConfig(num_virtual_tokens=2, template="{tokens}", projection_hidden_size=16),
         TokenClassification(TAGS)),
    ]):
        torch.manual_seed(i)
        bank.add(name, sp.SoftPromptModel(base, config, tokenizer=tok), task=task)
    return bank


@pytest.fixture
def causal_bank(gpt2_tokenizer):
    tok = gpt2_tokenizer
    base = make_llama(tok).eval()
    bank = PromptBank(base, tok)
    torch.manual_seed(0)
    bank.add("review", sp.SoftPromptModel(base, sp.PTuningConfig(template="[P:2] {text} It was [MASK]", encoder="mlp",
                                                                 encoder_hidden_size=16), tokenizer=tok),
             task=Verbalizer({"neg": ["bad"], "pos": ["good"]}))
    bank.add("writer", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}",
                                                                   init_std=0.5), tokenizer=tok))
    return bank


def same_prediction(got, expected):
    if isinstance(expected, list):
        return got == expected
    return got["label"] == expected["label"] and all(
        abs(got["scores"][k] - v) < 1e-5 for k, v in expected["scores"].items())


def test_interleaved_concurrent_requests_get_each_tasks_answer(encoder_bank):
    bank = encoder_bank
    app = create_app(bank, max_wait=0.02)
    jobs = []
    for i in range(48):
        task = ("sentiment", "topic", "ner")[i % 3]
        text = TEXTS[i % len(TEXTS)]
        jobs.append((task, text))
    expected = {(t, x): alone(bank[t], Engine._example(bank[t], x)) for t, x in jobs}
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        def call(job):
            task, text = job
            endpoint = "/v1/tag" if task == "ner" else "/v1/classify"
            r = client.post(endpoint, json={"task": task, "inputs": [text]})
            assert r.status_code == 200, r.text
            return job, r.json()["results"][0]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, jobs))
        for (task, text), answer in answers:
            if task == "ner":
                assert answer["tags"] == expected[(task, text)] and answer["tokens"] == text.split()
                assert all(answer["tokens"][e["start"]] in e["text"] for e in answer["entities"])
            else:
                assert same_prediction(answer, expected[(task, text)]), (task, text)
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["ner", "sentiment", "topic"]
        assert {m["id"]: m["method"] for m in models["data"]}["topic"] == "prompt-tuning"
        assert client.get("/health").json() == {"status": "ok", "tasks": 3}
        metrics = client.get("/metrics").text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("softprompt_batch_rows_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("softprompt_batch_rows_sum")))
    assert total == 48 and count < 48  # requests of different tasks and callers shared engine runs
    assert 'softprompt_requests_total{endpoint="/v1/classify",status="200"} 32.0' in metrics
    assert "softprompt_request_seconds_bucket" in metrics and "softprompt_queue_waiting 0.0" in metrics


def test_errors_name_the_problem(encoder_bank):
    app = create_app(encoder_bank, max_body_bytes=2000, max_inputs=4)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/classify", json={"task": "nope", "inputs": ["x"]})
        assert r.status_code == 404 and r.json() == {"error": {  # OpenAI's error body, whole
            "message": "unknown task 'nope'; loaded tasks: ner, sentiment, topic", "type": "invalid_request_error",
            "param": "task", "code": "model_not_found"}}
        r = client.post("/v1/classify", content=b'{"task": "sentiment", "inputs": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")
        r = client.post("/v1/classify", json={"task": "sentiment"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "inputs: Field required"
        assert r.json()["error"]["param"] == "inputs"
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["fine", {"txt": "x"}]})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("input 1:") and "'text'" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "inputs[1]"
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": [" ".join(["word"] * 600)]})
        assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["x" * 3000]})
        assert r.status_code == 413 and "over the limit of 2000" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["a"] * 5})
        assert r.status_code == 413 and "at most 4" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"task": "ner", "inputs": ["x"]})
        assert r.status_code == 422 and "/v1/tag" in r.json()["error"]["message"]
        r = client.post("/v1/tag", json={"task": "topic", "inputs": ["x"]})
        assert r.status_code == 422 and "/v1/classify" in r.json()["error"]["message"]
        r = client.put("/v1/prompts/x", json={"path": "/tmp"})
        assert r.status_code == 403 and "--admin" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "sentiment", "prompt": "x", "n": 0})
        assert r.status_code == 400 and r.json()["error"]["message"] == "n: Input should be greater than or equal to 1"
        assert r.json()["error"]["param"] == "n"
        r = client.post("/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"] == {"message": "Not Found", "type": "invalid_request_error",
                                                              "param": None, "code": None}


def test_admin_loads_and_unloads_prompts_and_the_api_key_guards_everything(encoder_bank, tmp_path):
    bank = encoder_bank
    folder = tmp_path / "prompts" / "sentiment2"
    bank["sentiment"].model.save_pretrained(folder)
    app = create_app(bank, admin=True, api_key="s3cret", prompt_root=tmp_path / "prompts")
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in [("get", "/health"), ("get", "/metrics"), ("get", "/v1/models"),
                             ("post", "/v1/classify"), ("delete", "/v1/prompts/topic")]:
            assert getattr(client, method)(path).status_code == 401, path
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.put("/v1/prompts/sentiment2", json={"path": str(folder)}, headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "loaded"
        r = client.post("/v1/completions", json={"model": "sentiment2", "prompt": "x"}, headers=auth)
        assert r.status_code == 422  # a BERT encoder cannot generate: named, not a crash
        r = client.put("/v1/prompts/evil", json={"path": str(tmp_path)}, headers=auth)
        assert r.status_code == 403 and "outside the prompt root" in r.json()["error"]["message"]
        r = client.put("/v1/prompts/..hidden", json={"path": str(folder)}, headers=auth)
        assert r.status_code == 422 and "invalid task name" in r.json()["error"]["message"]
        r = client.delete("/v1/prompts/topic", headers=auth)
        assert r.status_code == 200 and "topic" not in bank
        r = client.post("/v1/classify", json={"task": "topic", "inputs": ["x"]}, headers=auth)
        assert r.status_code == 404 and "loaded tasks: ner, sentiment, sentiment2" in r.json()["error"]["message"]


def test_completions_plain_and_streamed(causal_bank):
    bank = causal_bank
    engine = Engine(bank)
    expected = engine.generate("writer", ["a gem of a film"], max_new_tokens=6, temperature=0)[0]
    with Server(create_app(bank, engine=engine)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/completions", json={"model": "writer", "prompt": "a gem of a film", "max_tokens": 6,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
        with client.stream("POST", "/v1/completions", json={"model": "writer", "prompt": "a gem of a film",
                                                            "max_tokens": 6, "temperature": 0, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
        r = client.post("/v1/classify", json={"task": "review", "inputs": ["great"]})
        assert r.status_code == 200 and set(r.json()["results"][0]["scores"]) == {"neg", "pos"}


def test_metrics_time_a_stream_to_its_end_and_count_refused_requests(causal_bank):
    """The request metrics (`app.RequestMetrics`) time a streamed completion to its last
    chunk, not to its headers, and count requests refused before any route (401 here)."""
    with Server(create_app(causal_bank, api_key="s3cret")) as server, \
            httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Bearer s3cret"}) as client:
        body = {"model": "writer", "prompt": "a gem of a film", "max_tokens": 48, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            first = time.perf_counter()
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
            streaming = time.perf_counter() - first
        assert httpx.post(f"{server.url}/v1/classify", json={"task": "review", "inputs": ["x"]}).status_code == 401
        metrics = client.get("/metrics").text
    timed = float(re.search(r'softprompt_request_seconds_sum\{endpoint="/v1/completions"\} (\S+)', metrics).group(1))
    assert timed >= streaming > 0  # from the first chunk to [DONE] on the client's clock, within the server's
    assert 'softprompt_requests_total{endpoint="/v1/completions",status="200"} 1.0' in metrics
    assert 'softprompt_requests_total{endpoint="other",status="401"} 1.0' in metrics


def test_a_client_that_disconnects_mid_stream_frees_its_rows(causal_bank):
    app = create_app(causal_bank)
    batcher = app.state.batcher
    with Server(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json={"model": "writer", "prompt": "x", "max_tokens": 400,
                                                                "temperature": 0, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        break  # one piece, then hang up
        deadline = time.time() + 20
        while batcher.stats.runs < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert batcher.stats.runs == 1
        assert batcher.stats.new_tokens < 400  # the row stopped early: its slot is free
        with httpx.Client(base_url=server.url, timeout=30) as client:
            metrics = client.get("/metrics").text
        assert "softprompt_streams_open 0.0" in metrics


class Blocking(Engine):
    """An engine that holds its first run until released: the queue behind it fills."""

    def __init__(self, bank):
        super().__init__(bank)
        self.release = threading.Event()

    def run(self, requests, admit=None):
        self.release.wait(timeout=30)
        return [Result(r.task, output="ok") for r in requests]


def test_a_full_queue_answers_429_and_never_crashes(encoder_bank):
    engine = Blocking(encoder_bank)
    batcher = Batcher(engine, max_queue=2, max_wait=0)
    first = batcher.submit([Request("sentiment", "a")])  # taken by the worker, which blocks
    time.sleep(0.2)
    batcher.submit([Request("sentiment", "b"), Request("sentiment", "c")])  # fills the queue
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        batcher.submit([Request("sentiment", "d")])
    engine.release.set()
    assert first[0].result(timeout=10).output == "ok"
    batcher.close()
    app_engine = Blocking(encoder_bank)
    app = create_app(encoder_bank, engine=app_engine, max_queue=1, max_wait=0)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with ThreadPoolExecutor(3) as pool:
            calls = []
            for t in "abc":  # a: taken by the (blocked) worker; b: waits in the queue of one; c: refused
                calls.append(pool.submit(client.post, "/v1/classify", json={"task": "sentiment", "inputs": [t]}))
                time.sleep(0.3)
            app_engine.release.set()
            codes = [c.result().status_code for c in calls]
        assert codes == [200, 200, 429]
        assert calls[2].result().headers["retry-after"] == "1" and "waiting" in calls[2].result().json()["error"]["message"]
        assert {k: calls[2].result().json()["error"][k] for k in ("type", "code")} == {
            "type": "rate_limit_error", "code": "rate_limit_exceeded"}


def test_generation_requests_join_a_running_decode(causal_bank):
    """Continuous batching at the server: a completion that arrives while another decodes
    joins the running batch and ends first, within the same engine run; a classification
    request that arrives meanwhile is answered between two decode steps."""
    engine = Engine(causal_bank)
    alone = engine.generate("writer", ["a short one"], max_new_tokens=3, temperature=0)[0]
    classified = engine.classify("review", ["great"])[0]
    batcher = Batcher(engine, max_wait=0)
    submitted = threading.Event()
    # the long one's first piece waits (on the engine's thread) until the others are queued:
    # decoding has begun; 50 new tokens fill the tiny Llama's 64 positions (more are refused)
    begun = TokenStream(lambda text, logprobs: submitted.wait(timeout=30))
    try:
        long = batcher.submit([Request("writer", "a long one", generate=True, stream=begun,
                                       options={"max_new_tokens": 50, "temperature": 0})])[0]
        deadline = time.time() + 10
        while not long.running() and time.time() < deadline:
            time.sleep(0.001)
        short, label = batcher.submit([Request("writer", "a short one", generate=True,
                                               options={"max_new_tokens": 3, "temperature": 0}),
                                       Request("review", "great")])
        submitted.set()
        result = short.result(timeout=60)
        assert label.result(timeout=60).output == classified  # answered between decode steps
        assert not long.done()  # both ended inside the long request's run
        assert result.ok and result.output == alone and result.new_tokens == 3
        assert long.result(timeout=120).new_tokens > 3
        assert batcher.stats.runs == 2 and batcher.stats.rows == 3  # the decode run and one head forward
    finally:
        batcher.close()


def post_raw(client, path, text, **kwargs):
    """POST a body as written (Python's json.dumps would not write NaN as a client might)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"}, **kwargs)


def test_non_standard_json_numbers_get_a_400_that_names_the_field(causal_bank):
    """NaN, Infinity and 1e400 (read by Python as inf) are not JSON: before, a plain-text
    500 and a reset connection; now a JSON 400 naming the field, on a connection that
    stays usable."""
    with Server(create_app(causal_bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for body, field, number in [
            ('{"model": "writer", "prompt": "x", "temperature": NaN}', "temperature", "NaN"),
            ('{"model": "writer", "prompt": "x", "top_p": Infinity}', "top_p", "Infinity"),
            ('{"model": "writer", "prompt": "x", "temperature": 1e400}', "temperature", "1e400"),
            ('{"task": "review", "inputs": ["fine", -Infinity]}', "inputs[1]", "-Infinity"),
            ('{"task": "review", "inputs": [{"text": -1e999}]}', "inputs[0].text", "-1e999"),
        ]:
            endpoint = "/v1/completions" if "model" in body else "/v1/classify"
            r = post_raw(client, endpoint, body)
            assert r.status_code == 400, (body, r.status_code, r.text)
            detail = r.json()["error"]["message"]
            assert detail.startswith(f"{field}: {number} is not a JSON number"), detail
        r = client.post("/v1/classify", json={"task": "review", "inputs": ["great"]})  # the same connection
        assert r.status_code == 200
        r = post_raw(client, "/v1/classify", '{"task": "review", "inputs": [{"text": "great", "x": 1.5e300}]}')
        assert r.status_code == 200, r.text  # large but finite numbers are JSON
        r = post_raw(client, "/v1/classify", '{"task": "review", "inputs": ["great"], "x": 1.5e300}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "x"  # read, then refused as no field of the body
        assert r.json()["error"]["message"] == "x: unknown field (this request takes task, inputs)"


def test_a_lone_surrogate_in_any_text_field_gets_a_422_that_names_it(causal_bank):
    with Server(create_app(causal_bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for endpoint, body, field in [
            ("/v1/classify", r'{"task": "review", "inputs": ["ok", "ok", "ok", "\ud800 x"]}', "inputs[3]"),
            ("/v1/classify", r'{"task": "review", "inputs": ["ok", {"text": "a \udc00"}]}', "inputs[1].text"),
            ("/v1/classify", r'{"task": "review", "inputs": [{"te\ud800xt": "a"}]}', "inputs[0]: a key"),
            ("/v1/completions", r'{"model": "writer", "prompt": ["a", "\ud800"]}', "prompt[1]"),
            ("/v1/completions", r'{"model": "writer", "prompt": "a", "stop": "\udbff"}', "stop"),
            ("/v1/completions", r'{"model": "writer", "prompt": "a", "stop": ["ok", "\ud800"], "stream": true}',
             "stop[1]"),
        ]:
            r = post_raw(client, endpoint, body)
            assert r.status_code == 422, (body, r.status_code, r.text)
            detail = r.json()["error"]["message"]
            assert detail.startswith(f"{field} holds a lone UTF-16 surrogate"), detail
        r = post_raw(client, "/v1/classify", r'{"task": "review", "inputs": ["a smile \ud83d\ude00"]}')
        assert r.status_code == 200, r.text  # a surrogate pair is one character (U+1F600)


def test_a_streamed_completion_that_cannot_run_gets_the_status_of_a_whole_one(encoder_bank, causal_bank):
    """Before, a stream on an encoder task answered 200 and then an error event; now the
    same 422 as the whole completion, before any event (and a bad prompt in a stream too)."""
    with Server(create_app(encoder_bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        whole = client.post("/v1/completions", json={"model": "sentiment", "prompt": "x"})
        streamed = client.post("/v1/completions", json={"model": "sentiment", "prompt": "x", "stream": True})
        assert whole.status_code == 422
        assert (streamed.status_code, streamed.headers["content-type"]) == (422, "application/json")
        assert streamed.json() == whole.json()
    with Server(create_app(causal_bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"model": "writer", "prompt": ["fine", "word " * 100], "max_tokens": 4, "temperature": 0}
        whole = client.post("/v1/completions", json=body)  # the second prompt is over the model's 64 positions
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        assert whole.status_code == 413 and streamed.status_code == 413, (whole.text, streamed.text)
        assert streamed.json() == whole.json() and streamed.json()["error"]["message"].startswith("prompt 1:")


def test_more_inputs_than_the_queue_holds_get_413_not_429(encoder_bank):
    """A request that could never be queued is told so (413), not to retry later (429)."""
    with Server(create_app(encoder_bank, max_queue=3)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["a", "b", "c", "d"]})
        assert r.status_code == 413 and "queue ever holds" in r.json()["error"]["message"] and "at most 3" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "sentiment", "prompt": ["a"] * 4, "stream": True})
        assert r.status_code == 413
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["a", "b", "c"]})
        assert r.status_code == 200


def test_an_api_key_no_client_can_send_is_refused(encoder_bank):
    for key in ["clé", "ab\x01c", " key", "key\n", ""]:
        with pytest.raises(sp.ConfigError, match="API key"):
            create_app(encoder_bank, api_key=key)
    create_app(encoder_bank, api_key="s3cret-key_1.~!").state.batcher.close()


def test_admin_puts_of_bad_folders_get_a_4xx_and_leave_the_bank_as_it_was(causal_bank, tmp_path):
    """A NUL in the path, a task.json without its label words, a config nested past the
    parser's depth, one over the size cap, a template longer than the model: each a 4xx
    naming the problem (before: 500s, or a prompt that failed every request), and the task
    they would replace still answers as before."""
    bank = causal_bank
    root = tmp_path / "prompts"
    good = root / "good"
    save_with_task(bank["review"].model, bank["review"].task, good, {})
    bad = {}
    for name, edit in [
        ("no_label_words", lambda f: f.joinpath("task.json").write_text(json.dumps(
            {k: v for k, v in json.loads(f.joinpath("task.json").read_text()).items() if k != "label_words"}))),
        ("deep", lambda f: f.joinpath("prompt_config.json").write_text("[" * 100_000 + "]" * 100_000)),
        ("huge", lambda f: _sparse(f / "task.json", 17 << 20)),
    ]:
        shutil.copytree(good, root / name)
        edit(root / name)
        bad[name] = root / name
    torch.manual_seed(0)
    long = sp.SoftPromptModel(bank.base, sp.PromptTuningConfig(template="[P:70] {text}"), tokenizer=bank.tokenizer)
    long.save_pretrained(root / "long")  # 70 virtual tokens: the tiny Llama has 64 positions
    before = bank["review"]
    app = create_app(bank, admin=True, prompt_root=root)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        expected = client.post("/v1/classify", json={"task": "review", "inputs": ["great"]}).json()
        for path, status, words in [
            (str(good) + "\x00x", 422, "NUL"),
            (str(bad["no_label_words"]), 422, "label_words"),
            (str(bad["deep"]), 422, "nested too deeply"),
            (str(bad["huge"]), 422, "over the limit"),
            (str(root / "long"), 422, "64 positions"),
        ]:
            r = client.put("/v1/prompts/review", json={"path": path})
            assert r.status_code == status and words in r.json()["error"]["message"], (path, r.status_code, r.text)
            assert bank["review"] is before
            assert client.post("/v1/classify", json={"task": "review", "inputs": ["great"]}).json() == expected
        r = client.put("/v1/prompts/review", json={"path": str(good)})
        assert r.status_code == 200 and r.json()["status"] == "replaced"


def _sparse(path, size):
    """A file of `size` bytes that takes no disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_template_longer_than_the_model_is_refused_when_loaded(encoder_bank, tmp_path):
    """Before, it loaded and then failed every request sent to it."""
    bank = encoder_bank
    long = sp.SoftPromptModel(bank.base, sp.PromptTuningConfig(template="[P:62] {text}"), tokenizer=bank.tokenizer)
    with pytest.raises(sp.SoftPromptError, match=r"task 'long': the template's virtual tokens \(62\), anchors \(0\) "
                                                 r"and special tokens \(2\) take 64 of the 64 positions"):
        bank.add("long", long)  # [CLS] [P:62] [SEP]: no room for a word
    assert "long" not in bank
    long.save_pretrained(tmp_path / "prompts" / "long")
    with pytest.raises(sp.SoftPromptError, match="task 'long'.*64 positions"):
        PromptBank.from_directory(bank.base, bank.tokenizer, tmp_path / "prompts")
    fits = sp.SoftPromptModel(bank.base, sp.PromptTuningConfig(template="[P:61] {text}"), tokenizer=bank.tokenizer)
    assert bank.add("fits", fits).num_virtual_tokens == 61


def without_seqeval(monkeypatch):
    """`extras.require` as it answers where seqeval is not installed, in serve/app.py."""
    from softprompt import extras
    from softprompt.serve import app

    def require(module, extra, feature):
        if module.startswith("seqeval"):
            raise extras.MissingExtraError(f"{feature} needs the 'seqeval' package: pip install 'softprompt[{extra}]'")
        return extras.require(module, extra, feature)

    monkeypatch.setattr(app, "require", require)


def test_a_server_without_seqeval_refuses_to_start_with_a_tagger(encoder_bank, monkeypatch):
    """A tagger loaded at start-up, on an install without the `ner` extra: the server does
    not start (before, it started and answered every /v1/tag with a 500), and says which
    task needs which package."""
    without_seqeval(monkeypatch)
    with pytest.raises(sp.ConfigError, match=r"task 'ner' \(a tagger.*needs the 'seqeval' package.*softprompt\[ner\]"):
        create_app(encoder_bank)


def test_a_tag_request_on_a_server_without_seqeval_says_which_package_is_missing(encoder_bank, monkeypatch):
    """The entity spans of /v1/tag need the `ner` extra: a server installed without it, whose
    tagger came after start-up (``--lazy``, an admin load), answers with what to install, in
    the API's error format, not "internal server error"."""
    application = create_app(encoder_bank)  # seqeval present at start-up: the check passes
    without_seqeval(monkeypatch)
    with Server(application) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/tag", json={"task": "ner", "inputs": ["Anna flew to Paris"]})
        assert r.status_code == 500
        error = r.json()["error"]
        assert "needs the 'seqeval' package" in error["message"] and "softprompt[ner]" in error["message"]
        assert error["code"] == "missing_extra"
