"""The base's tokenizer over HTTP in vLLM's shapes (`serve/tokenizer_api.py`: what lm-eval's
remote tokenizer backend reads): the real server on loopback, every answer checked
against the tokenizer itself; bad ids and unknown models refused in OpenAI's error body."""

from __future__ import annotations

import json

import httpx
import pytest

from softprompt.serve import create_app

from serving import Server
from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

POSITIONS = 128  # the tiny Llama's (`llama` in test_serve_isolation)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                "{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture
def served(causal_bank):
    causal_bank.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        with Server(create_app(causal_bank)) as server:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                yield client, causal_bank.tokenizer
    finally:
        causal_bank.tokenizer.chat_template = None


def test_tokenizer_info_names_the_special_tokens_and_the_chat_template(served):
    client, tokenizer = served
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == CHAT_TEMPLATE
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["model_max_length"] == POSITIONS


def test_tokenize_gives_the_tokenizers_ids(served):
    client, tokenizer = served
    text = "the film was good"
    answer = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert answer["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert answer["count"] == len(answer["tokens"]) and answer["token_strs"] is None
    assert answer["max_model_len"] == POSITIONS
    named = client.post("/tokenize", json={"model": "writer", "prompt": text, "return_token_strs": True}).json()
    assert named["tokens"] == tokenizer(text)["input_ids"]  # add_special_tokens defaults to true, as in vLLM
    assert named["token_strs"] == tokenizer.convert_ids_to_tokens(named["tokens"])
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer("<user>hi<assistant>", add_special_tokens=False)["input_ids"]


def test_detokenize_inverts_tokenize(served):
    client, tokenizer = served
    ids = client.post("/tokenize", json={"prompt": "once upon a time", "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "once upon a time"}


def test_tokenized_prompt_completes_as_its_text(served):
    client, _ = served
    ids = client.post("/tokenize", json={"prompt": "the film was", "add_special_tokens": False}).json()["tokens"]
    body = {"model": "writer", "max_tokens": 5, "temperature": 0}
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    by_text = client.post("/v1/completions", json={**body, "prompt": "the film was"}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


@pytest.mark.parametrize("path, body, status, param, message", [
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens[1]", "tokens[1]: id 1000000000 is outside the vocabulary"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model", "model 'nope' is not served"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "prompt",
     "give a prompt or messages (one of the two)"),
    ("/tokenize", {"prompt": "a \ud800 b"}, 422, "prompt", "prompt holds a lone UTF-16 surrogate (\\ud800)"),
    ("/tokenize", {"prompt": "x", "add_special_token": True}, 400, "add_special_token", "add_special_token: unknown field"),
])
def test_bad_requests_are_refused_by_name(served, path, body, status, param, message):
    client, _ = served
    answer = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})  # \ud800 escaped
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error


def test_softprompt_tokenizer_saves_the_served_bases_tokenizer(gpt2_tokenizer, tmp_path):
    """`softprompt tokenizer MODEL -o DIR`: a folder transformers loads, tokenizing as the
    base `softprompt serve --model MODEL` serves does; an existing folder is refused."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from conftest import make_gpt2
    from softprompt.base_models import load_base
    from softprompt.cli import app

    base_dir = tmp_path / "tiny-gpt2"
    make_gpt2(gpt2_tokenizer).save_pretrained(base_dir)
    gpt2_tokenizer.save_pretrained(base_dir)
    out = tmp_path / "tok"
    r = CliRunner().invoke(app, ["tokenizer", str(base_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    saved, served = AutoTokenizer.from_pretrained(out), load_base(str(base_dir))[1]
    text = "the film was <|endoftext|> good"
    assert saved(text)["input_ids"] == served(text)["input_ids"]
    assert (saved.eos_token, saved.pad_token) == (served.eos_token, served.pad_token)
    again = CliRunner().invoke(app, ["tokenizer", str(base_dir), "-o", str(out)])
    assert again.exit_code != 0 and "exists already" in again.output
