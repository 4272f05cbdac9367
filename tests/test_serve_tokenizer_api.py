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
