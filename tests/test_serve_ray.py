"""The server on Ray Serve (`serve/ray.py`, issue 22 item 1), on a local Ray cluster on the
CPU with 2 replicas and a tiny GPT-2: the answers (completions, streamed or not, the base
alone, a classifier, /v1/models, errors) equal the single-process server's, and requests
of a task go to a replica that has read it (Ray Serve's multiplexing)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray  # the ray extra is part of [all], which CI installs
import torch
from ray import serve

import softprompt as sp
from softprompt.base_models import load_base
from softprompt.folder import save_with_task
from softprompt.serve import Engine, PromptBank, create_app
from softprompt.serve.ray import REPLICA_HEADER, deployment, task_of
from softprompt.tasks import SequenceClassification

from conftest import make_gpt2
from serving import Server, free_port

BASE = "tiny-gpt2"
REQUESTS = [
    ("POST", "/v1/completions", {"model": "writer", "prompt": "a gem of a film", "max_tokens": 5, "temperature": 0}),
    ("POST", "/v1/completions", {"model": BASE, "prompt": "a gem of a film", "max_tokens": 4, "temperature": 0}),
    ("POST", "/v1/completions", {"model": "other", "prompt": ["bad", "a film"], "max_tokens": 3, "temperature": 0,
                                 "logprobs": 2}),
    ("POST", "/v1/classify", {"task": "sentiment", "inputs": ["a gem of a film", "bad"]}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "nosuch", "prompt": "x"}),
    ("POST", "/v1/completions", {"model": "writer", "prompt": "x", "max_tokens": -1}),
    ("POST", "/v1/classify", {"task": "writer", "inputs": ["x"]}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("ray")
    model_dir = root / BASE
    make_gpt2(gpt2_tokenizer).save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    base, tok = load_base(str(model_dir))
    prompts = root / "prompts"
    for i, name in enumerate(("writer", "other")):
        torch.manual_seed(i)
        sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}", init="vocab"),
                           tokenizer=tok).save_pretrained(prompts / name)
    torch.manual_seed(5)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}"), tokenizer=tok)
    task = SequenceClassification(["neg", "pos"], pool="last")
    task.bind(model)
    save_with_task(model, task, prompts / "sentiment", {})
    return model_dir, prompts


@pytest.fixture(scope="module")
def cluster(store):
    model_dir, prompts = store
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(model_dir), prompts, replicas=2, base_name=BASE), name="softprompt",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _answer(r: httpx.Response):
    body = r.json()
    body.pop("id", None)
    body.pop("created", None)
    return r.status_code, body


def _same(a, b, where="") -> None:
    """Equal answers: every text, token and label equal; scores and log-probabilities to
    1e-4 (a replica's process runs its matrix products on other threads)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_answers_equal_the_single_process_server(store, cluster):
    model_dir, prompts = store
    base, tok = load_base(str(model_dir))
    bank = PromptBank.from_directory(base, tok, prompts, lazy=True, max_in_memory=64)
    bank.add_base(BASE)
    with Server(create_app(bank, engine=Engine(bank))) as single, httpx.Client(timeout=60) as client:
        for method, path, body in REQUESTS:
            alone = client.request(method, single.url + path, json=body)
            fleet = client.request(method, cluster + path, json=body)
            _same(_answer(fleet), _answer(alone), f"{path} {body}")
            assert fleet.headers.get(REPLICA_HEADER), fleet.headers
        streamed = {"model": "writer", "prompt": "a gem of a film", "max_tokens": 5, "temperature": 0, "stream": True}
        texts = []
        for url in (single.url, cluster):
            with client.stream("POST", url + "/v1/completions", json=streamed) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            texts.append("".join(e["choices"][0]["text"] for e in events))
        assert texts[0] == texts[1] and texts[0]


def test_a_task_s_requests_go_to_a_replica_that_read_it(cluster):
    with httpx.Client(base_url=cluster, timeout=60) as client:
        body = {"model": "other", "prompt": "a film", "max_tokens": 2, "temperature": 0}
        first = client.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        time.sleep(3)  # the replicas report the tasks they hold to the router every few seconds
        replicas = {client.post("/v1/completions", json=body).headers[REPLICA_HEADER] for _ in range(8)}
        assert len(replicas) == 1, replicas


def test_bad_deployment_settings_are_named():
    from softprompt.errors import ConfigError

    with pytest.raises(ConfigError, match="replicas must be a positive integer"):
        deployment("minilm", "prompts", replicas=None)
    with pytest.raises(ConfigError, match="max_tasks_per_replica must be a positive integer, got 0"):
        deployment("minilm", "prompts", max_tasks_per_replica=0)


def test_the_task_is_read_from_the_body():
    assert task_of("/v1/completions", b'{"model": "a", "prompt": "x"}') == "a"
    assert task_of("/v1/classify/", b'{"task": "b"}') == "b"
    assert task_of("/v1/models", b"") == ""
    assert task_of("/v1/completions", b"not json") == "" and task_of("/v1/completions", b'["a"]') == ""
    assert task_of("/v1/completions", b'{"model": 3}') == ""

