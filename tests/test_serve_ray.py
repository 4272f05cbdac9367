"""The server on Ray Serve (`serve/ray.py`, issue 22 item 1), on a local Ray cluster on the
CPU with 2 replicas and a tiny GPT-2: the answers (completions, streamed or not, the base
alone, a classifier, /v1/models, errors) equal the single-process server's, requests of a
task go to a replica that has read it (Ray Serve's multiplexing), admin loads and unloads
reach every replica, and a replica killed under load is replaced (the last test: it runs
after the others, on the same cluster)."""

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
        serve.run(deployment(str(model_dir), prompts, replicas=2, base_name=BASE, app_options={"admin": True}),
                  name="softprompt", route_prefix="/")
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



def _models_by_replica(client: httpx.Client, want: int = 2, seconds: float = 60) -> dict[str, list[str]]:
    """/v1/models as each replica answers it (Ray Serve spreads requests without a task
    over the replicas): replica -> task ids, once `want` replicas have answered. Asked for
    up to `seconds`: a replica that has just started reaches the router's table a little
    after Ray Serve reports it running."""
    seen: dict[str, list[str]] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = client.get("/v1/models")
        assert r.status_code == 200, r.text
        seen[r.headers[REPLICA_HEADER]] = sorted(m["id"] for m in r.json()["data"])
        if len(seen) >= want:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"only {len(seen)} replica(s) answered /v1/models in {seconds:.0f} s: {seen}")


def test_admin_loads_and_unloads_reach_every_replica(store, cluster):
    model_dir, prompts = store
    body = {"model": "writer2", "prompt": "a gem of a film", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=cluster, timeout=60) as client:
        r = client.put("/v1/prompts/writer2", json={"path": str(prompts / "writer")})
        assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
        for replica, tasks in _models_by_replica(client).items():
            assert "writer2" in tasks, (replica, tasks)  # the replica that loaded it, and the other one
        same = client.post("/v1/completions", json={**body, "model": "writer"}).json()["choices"][0]["text"]
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == same
        outside = client.put("/v1/prompts/evil", json={"path": str(model_dir)})
        assert outside.status_code == 403 and "outside the prompt root" in outside.json()["error"]["message"]
        assert client.delete("/v1/prompts/writer2").status_code == 200
        for replica, tasks in _models_by_replica(client).items():
            assert "writer2" not in tasks and "evil" not in tasks, (replica, tasks)
        gone = client.post("/v1/completions", json=body)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "writer3", "lora_path": str(prompts / "writer")})
        assert r.status_code == 200, r.text  # vLLM's alias: logged the same way
        for replica, tasks in _models_by_replica(client).items():
            assert "writer3" in tasks, (replica, tasks)


def _replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SoftPromptReplica" in a["name"] and a.get("namespace") == "serve")


def _running() -> int:
    """Replicas running (started and answering), as Ray Serve's controller reports them."""
    states = serve.status().applications["softprompt"].deployments["SoftPromptReplica"].replica_states
    return states.get("RUNNING", 0)


def test_a_replica_killed_under_load_is_replaced_and_replays_the_admin_log(store, cluster):
    """8 clients send completions and classifications while one replica is killed: the
    requests on it that had not started their answer are sent once more, to the other
    replica (the failures allowed: those whose answer was under way, at most one per
    client); Ray Serve starts a replacement, which serves the task the admin loaded before
    it existed (it replays the registry's log)."""
    prompts = store[1]
    with httpx.Client(base_url=cluster, timeout=60) as client:
        assert client.put("/v1/prompts/writer4", json={"path": str(prompts / "other")}).status_code == 200
        before = _models_by_replica(client)
    actors = _replica_actors()
    assert len(actors) == 2, actors
    statuses: list[int | str] = []
    stop = time.monotonic() + 8
    bodies = [("/v1/completions", {"model": "writer", "prompt": "a gem of a film", "max_tokens": 3, "temperature": 0}),
              ("/v1/completions", {"model": "writer4", "prompt": "bad", "max_tokens": 3, "temperature": 0}),
              ("/v1/classify", {"task": "sentiment", "inputs": ["a gem of a film"]})]

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=cluster, timeout=60) as c:
            i = k
            while time.monotonic() < stop:
                path, body = bodies[i % len(bodies)]
                try:
                    statuses.append(c.post(path, json=body).status_code)
                except httpx.HTTPError as e:
                    statuses.append(type(e).__name__)
                i += 1

    import threading

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    ray.kill(ray.get_actor(actors[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join()
    failed = [s for s in statuses if s != 200]
    print(json.dumps({"requests": len(statuses), "failed": len(failed), "statuses": sorted(set(map(str, failed)))}))
    assert len(statuses) > 50 and len(failed) <= 8, failed
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (_running() != 2 or actors[0] in _replica_actors()):
        time.sleep(1)
    assert _running() == 2 and actors[0] not in _replica_actors(), (_running(), _replica_actors())
    with httpx.Client(base_url=cluster, timeout=60) as client:
        after = _models_by_replica(client)
    assert set(after) - set(before), (before, after)  # a new replica answers
    for replica, tasks in after.items():
        assert "writer4" in tasks, (replica, tasks)


def test_autoscaling_scales_the_replicas_and_a_route_prefix_is_served(store, cluster):
    """`deployment(autoscaling_config=...)` is Ray Serve's own: from one replica, a load
    above the target of ongoing requests per replica brings a second one up, and every
    request is answered meanwhile. The application runs under a route prefix (``/scaled``),
    which the router strips before the replica's routes see the path. (An application of
    its own beside the module's, whose 2 replicas are fixed; after the other tests.)"""
    import threading

    model_dir, prompts = store
    serve.run(deployment(str(model_dir), prompts, replicas=None, base_name=BASE,
                         autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                             "upscale_delay_s": 0.5, "downscale_delay_s": 600,
                                             "metrics_interval_s": 0.5, "look_back_period_s": 1}),
              name="scaled", route_prefix="/scaled")
    try:
        def running() -> int:
            states = serve.status().applications["scaled"].deployments["SoftPromptReplica"].replica_states
            return states.get("RUNNING", 0)

        assert running() == 1
        body = {"model": "writer", "prompt": "a gem of a film", "max_tokens": 6, "temperature": 0}
        statuses: list = []
        stop = time.monotonic() + 90

        def client_loop() -> None:
            with httpx.Client(base_url=cluster, timeout=60) as c:
                while time.monotonic() < stop and running() < 2:
                    statuses.append(c.post("/scaled/v1/completions", json=body).status_code)

        threads = [threading.Thread(target=client_loop) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert running() == 2, serve.status().applications["scaled"]
        assert statuses and set(statuses) == {200}, statuses
    finally:
        serve.delete("scaled")
