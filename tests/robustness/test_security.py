"""Security: nothing a user hands softprompt is unpickled; task names cannot reach outside
the prompt folder; the server binds to loopback unless told otherwise, checks the API key
on every path, keeps its admin endpoints off unless enabled, and bounds request bodies,
inputs and tokens.

The server cases run a real uvicorn on 127.0.0.1 (in a thread, or the real `softprompt
serve` command in a subprocess where the command's own defaults are what is tested)."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.serve import PromptBank, check_task_name, create_app
from softprompt.tasks import SequenceClassification

from conftest import make_bert, make_gpt2, save_served
from serving import Server, free_port, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "softprompt"


# -- nothing is unpickled -------------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_package_has_no_pickle_no_torch_load_and_no_remote_code():
    """Read from the source: no `pickle`/`dill`/`joblib`/`marshal` import, no `torch.load`,
    no `weights_only=False`, no `trust_remote_code=True`, no eval/exec."""
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "marshal", "cloudpickle") for n in names):
                    found.append(f"{path}:{node.lineno}: imports {names}")
                if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in names:
                    found.append(f"{path}:{node.lineno}: imports torch.load")
        for call, name in _calls(tree):
            if name in ("torch.load", "eval", "exec"):
                found.append(f"{path}:{call.lineno}: calls {name}")
            for kw in call.keywords:
                if (kw.arg, ast.unparse(kw.value)) in (("weights_only", "False"), ("trust_remote_code", "True")):
                    found.append(f"{path}:{call.lineno}: {kw.arg}={ast.unparse(kw.value)}")
    assert not found, "\n".join(found)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way to unpickle raises while the block runs: a load path that reaches one fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)


def test_every_load_path_reads_only_safetensors_and_json(no_unpickling, wordpiece_tokenizer, gpt2_tokenizer, tmp_path):
    """Save through the public API, then load every kind of file back (a prompt with its
    trainable state, a training checkpoint on resume, a PEFT adapter, a served bank, a
    base model folder) with every unpickler disabled."""
    from softprompt.base_models import load_base
    from softprompt.peft_format import export_peft, import_peft
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    tok = wordpiece_tokenizer
    base = make_bert(tok).bert
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded_base, _ = load_base(str(tmp_path / "base"))
    torch.manual_seed(0)
    model = sp.SoftPromptModel(loaded_base, sp.PTuningConfig(template="[P:2] {text}", encoder="lstm",
                                                             encoder_hidden_size=8), tokenizer=tok)
    model.save_pretrained(tmp_path / "prompt")
    sp.SoftPromptModel.from_pretrained(loaded_base, tmp_path / "prompt", tokenizer=tok, trainable=True)
    data = [{"text": t, "label": l} for t, l in [("good", "pos"), ("bad", "neg")] * 4]
    config = TrainConfig(steps=2, batch_size=4, eval_every=1, progress=False)
    train(model, SequenceClassification(["neg", "pos"]), data, data, config, tmp_path / "run")
    config.steps = 3
    train(model, SequenceClassification(["neg", "pos"]), data, data, config, tmp_path / "run", resume=True)
    gpt2 = make_gpt2(gpt2_tokenizer)
    causal = sp.SoftPromptModel(gpt2, sp.PromptTuningConfig(template="[P:3] [START] {text}"), tokenizer=gpt2_tokenizer)
    export_peft(causal, tmp_path / "adapter")
    import_peft(tmp_path / "adapter", gpt2, gpt2_tokenizer)
    (tmp_path / "bank").mkdir()
    model.save_pretrained(tmp_path / "bank" / "sentiment")
    assert PromptBank.from_directory(loaded_base, tok, tmp_path / "bank").names() == ["sentiment"]


# -- task names -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../etc", "..", ".hidden", "a/b", "a\\b", "", "x" * 65, "tab\tname", "nul\x00",
                                  "-leading-dash", "sp ace", "dot..dot", "/abs"])
def test_task_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(ConfigError, match="invalid task name"):
        check_task_name(name)


@pytest.mark.parametrize("name", ["sst2", "ner.v2", "A-b_c", "x" * 64])
def test_plain_task_names_are_accepted(name):
    assert check_task_name(name) == name


def test_a_bank_folder_loads_no_hidden_folders_and_refuses_odd_names(wordpiece_tokenizer, tmp_path):
    tok = wordpiece_tokenizer
    base = make_bert(tok).bert
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=2), tokenizer=tok)
    model.save_pretrained(tmp_path / "bank" / "sentiment")
    model.save_pretrained(tmp_path / "bank" / ".sentiment.tmp-deadbeef-1-abcdefgh")  # a writer's temporary
    assert PromptBank.from_directory(base, tok, tmp_path / "bank").names() == ["sentiment"]
    model.save_pretrained(tmp_path / "bank" / "two words")
    with pytest.raises(ConfigError, match="invalid task name 'two words'"):
        PromptBank.from_directory(base, tok, tmp_path / "bank")


# -- the server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    base = make_bert(tok).bert.eval()
    bank = PromptBank(base, tok)
    torch.manual_seed(0)
    bank.add("sentiment", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=2), tokenizer=tok),
             task=SequenceClassification(["neg", "pos"]))
    return bank


def every_path(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every route FastAPI registered, its own pages included,
    plus a path nobody registered."""
    out = [("GET", "/no/such/path")]
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            if method != "HEAD":
                out.append((method, route.path.replace("{task}", "sentiment")))
    return out


def test_the_api_key_guards_every_path_fastapi_pages_included(bank):
    app = create_app(bank, api_key="s3cret", admin=True)
    paths = every_path(app)
    assert {"/docs", "/openapi.json", "/health", "/metrics", "/v1/classify", "/v1/prompts/sentiment"} <= {p for _, p in paths}
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}, {"Authorization": "s3cret"}):
                r = client.request(method, path, headers=headers, content=b"{not json")
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
        for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}):
            assert client.get("/health", headers=headers).status_code == 200
            assert client.get("/docs", headers=headers).status_code == 200


def test_admin_endpoints_are_off_unless_enabled(bank):
    with Server(create_app(bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for method, body in [("PUT", b'{"path": "/"}'), ("PUT", b"{not json"), ("PUT", b""), ("DELETE", b"")]:
            r = client.request(method, "/v1/prompts/sentiment", content=body)
            assert r.status_code == 403 and "--admin" in r.json()["error"]["message"], (method, body, r.text)
        assert "sentiment" in bank
        assert client.post("/v1/classify", json={"task": "sentiment", "inputs": ["fine"]}).status_code == 200


def test_request_bodies_inputs_and_tokens_are_bounded(bank):
    app = create_app(bank, max_body_bytes=2000, max_inputs=4, max_new_tokens=8)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        big = {"task": "sentiment", "inputs": ["word " * 500]}
        r = client.post("/v1/classify", json=big)
        assert r.status_code == 413 and "over the limit of 2000" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the body arrives in chunks and is counted as it comes
            yield b'{"task": "sentiment", "inputs": ["'
            for _ in range(50):
                yield b"word " * 20
            yield b'"]}'

        r = client.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "over the limit of 2000 bytes" in r.json()["error"]["message"], r.text

        def small():
            yield b'{"task": "sentiment", '
            yield b'"inputs": ["a gem"]}'

        r = client.post("/v1/classify", content=small(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["results"][0]["label"] in ("neg", "pos")
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": ["a"] * 5})
        assert r.status_code == 413 and "5 inputs" in r.json()["error"]["message"] and "at most 4" in r.json()["error"]["message"]
        long_input = " ".join(["word"] * 300)  # under the body limit, over the model's 64 positions
        r = client.post("/v1/classify", json={"task": "sentiment", "inputs": [long_input]})
        assert r.status_code == 413 and "input 0" in r.json()["error"]["message"], r.text
        assert client.get("/health").status_code == 200


def test_completion_tokens_are_bounded(gpt2_tokenizer):
    base = make_gpt2(gpt2_tokenizer).eval()
    bank = PromptBank(base, gpt2_tokenizer)
    bank.add("writer", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=2), tokenizer=gpt2_tokenizer))
    with Server(create_app(bank, max_new_tokens=8)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/completions", json={"model": "writer", "prompt": "once", "max_tokens": 9})
        assert r.status_code == 400 and "max_tokens: 9 is over the server's limit of 8" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "max_tokens"
        r = client.post("/v1/completions", json={"model": "writer", "prompt": "once", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


# -- the real command's defaults ------------------------------------------------------------
def _listening(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) of the TCP sockets listening on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.append(address)
    return out


@pytest.fixture(scope="module")
def prompts_folder(tmp_path_factory, wordpiece_tokenizer):
    root = tmp_path_factory.mktemp("served")
    save_served(root, make_bert(wordpiece_tokenizer).bert, wordpiece_tokenizer,
                {"sentiment": sp.PTuningV2Config(num_virtual_tokens=2)})
    return root


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the kernel's socket table (Linux)")
def test_serve_binds_to_loopback_by_default_and_takes_the_key_from_the_environment(prompts_folder):
    port = free_port()
    env = os.environ | {"SOFTPROMPT_API_KEY": "from-env"}
    server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(prompts_folder / "base"),
                               "--prompts", str(prompts_folder / "prompts"), "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, server, status=401)  # the key from the environment is required
        assert _listening(port) == ["0100007F"], _listening(port)  # 127.0.0.1 only, no 0.0.0.0 or ::
        assert httpx.get(f"{url}/health", headers={"Authorization": "Bearer from-env"}, timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_admin_on_a_public_address_without_a_key_is_refused(prompts_folder):
    env = {k: v for k, v in os.environ.items() if k != "SOFTPROMPT_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(prompts_folder / "base"),
                        "--prompts", str(prompts_folder / "prompts"), "--host", "0.0.0.0", "--admin",
                        "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--admin on the non-loopback address 0.0.0.0 needs --api-key" in r.stderr, r.stderr
