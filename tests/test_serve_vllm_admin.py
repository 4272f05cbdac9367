"""vLLM's runtime adapter routes, ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``
and ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``, as aliases of the admin API, on a real
server on loopback: vLLM's bodies and plain-text answers, the admin routes' checks (key,
prompt root, task name, admin switch), errors in OpenAI's body naming vLLM's fields."""

from __future__ import annotations

import httpx
import pytest
import torch

import softprompt as sp
from softprompt.folder import save_with_task
from softprompt.serve import PromptBank, create_app
from softprompt.tasks import SequenceClassification

from conftest import make_bert
from serving import Server

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture
def bank_and_folders(wordpiece_tokenizer, tmp_path):
    """A bank with one task, and two more tasks' folders under the prompt root (labels
    neg / pos and film / food / place, so a replacement shows in the answers)."""
    tok = wordpiece_tokenizer
    base = make_bert(tok).bert.eval()
    bank = PromptBank(base, tok)
    torch.manual_seed(0)
    bank.add("sentiment", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=2, template="{text}"),
                                             tokenizer=tok), task=SequenceClassification(["neg", "pos"]))
    root = tmp_path / "prompts"
    for name, labels in (("binary", ["neg", "pos"]), ("topics", ["film", "food", "place"])):
        model = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}"), tokenizer=tok)
        task = SequenceClassification(labels)
        task.bind(model)
        save_with_task(model, task, root / name, {})
    (root / "empty").mkdir()
    return bank, root


def classify(client, task, headers=AUTH):
    return client.post("/v1/classify", json={"task": task, "inputs": ["a gem of a film"]}, headers=headers)


def error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_load_and_unload_under_vllms_names_and_answers(bank_and_folders, tmp_path):
    bank, root = bank_and_folders
    app = create_app(bank, admin=True, api_key=KEY, prompt_root=root)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(LOAD, json={"lora_name": "review", "lora_path": str(root / "binary")}, headers=AUTH)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'review' added successfully."
        assert r.headers["content-type"].startswith("text/plain")
        assert "review" in bank and "review" in {m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
        assert set(classify(client, "review").json()["results"][0]["scores"]) == {"neg", "pos"}

        # vLLM refuses a name already loaded; load_inplace replaces it
        r = client.post(LOAD, json={"lora_name": "review", "lora_path": str(root / "topics")}, headers=AUTH)
        assert r.status_code == 400
        assert error(r)["param"] == "lora_name" and "already been loaded" in error(r)["message"]
        assert set(classify(client, "review").json()["results"][0]["scores"]) == {"neg", "pos"}
        r = client.post(LOAD, json={"lora_name": "review", "lora_path": str(root / "topics"), "load_inplace": True},
                        headers=AUTH)
        assert r.status_code == 200, r.text
        assert set(classify(client, "review").json()["results"][0]["scores"]) == {"film", "food", "place"}

        r = client.post(UNLOAD, json={"lora_name": "review"}, headers=AUTH)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'review' removed successfully."
        assert "review" not in bank and classify(client, "review").status_code == 404
        r = client.post(UNLOAD, json={"lora_name": "review", "lora_int_id": 1}, headers=AUTH)
        assert r.status_code == 404
        assert error(r)["param"] == "lora_name" and error(r)["code"] == "model_not_found"
        # the same bank as the admin routes: what one loads, the other unloads
        assert client.put("/v1/prompts/other", json={"path": str(root / "binary")}, headers=AUTH).status_code == 200
        assert client.post(UNLOAD, json={"lora_name": "other"}, headers=AUTH).status_code == 200
        assert "other" not in bank


@pytest.mark.parametrize("body, status, param, says", [
    ({"lora_name": "x", "lora_path": "OUTSIDE"}, 403, "lora_path", "outside the prompt root"),
    ({"lora_name": "x", "lora_path": "ROOT/empty"}, 400, "lora_path", "ROOT/empty"),
    ({"lora_name": "..hidden", "lora_path": "ROOT/binary"}, 400, "lora_name", "invalid task name"),
    ({"lora_name": "x"}, 400, "lora_path", "lora_path"),
    ({"lora_name": "x", "lora_path": "ROOT/binary", "lora_rank": 8}, 400, "lora_rank", "unknown field"),
    ({"lora_name": "x", "lora_path": "ROOT/binary", "load_inplace": "maybe"}, 400, "load_inplace", "load_inplace"),
])
def test_refusals_name_vllms_fields_in_openais_error_body(bank_and_folders, tmp_path, body, status, param, says):
    bank, root = bank_and_folders
    body = {k: v.replace("OUTSIDE", str(tmp_path)).replace("ROOT", str(root)) if isinstance(v, str) else v
            for k, v in body.items()}
    with Server(create_app(bank, admin=True, prompt_root=root)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(LOAD, json=body)
        assert r.status_code == status, r.text
        e = error(r)
        assert e["param"] == param and says.replace("ROOT", str(root)) in e["message"]
        assert e["type"] == ("permission_error" if status == 403 else "invalid_request_error")
        assert bank.names() == ["sentiment"]


def test_the_key_is_checked_as_on_the_admin_routes(bank_and_folders):
    bank, root = bank_and_folders
    with Server(create_app(bank, admin=True, api_key=KEY, prompt_root=root)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": "wrong"}):
            admin = client.put("/v1/prompts/a", json={"path": str(root / "binary")}, headers=headers)
            load = client.post(LOAD, json={"lora_name": "b", "lora_path": str(root / "binary")}, headers=headers)
            unload = client.post(UNLOAD, json={"lora_name": "sentiment"}, headers=headers)
            assert admin.status_code == load.status_code == unload.status_code == 401, headers
            assert error(load)["type"] == "authentication_error"
        assert bank.names() == ["sentiment"]
        r = client.post(LOAD, json={"lora_name": "b", "lora_path": str(root / "binary")}, headers={"X-API-Key": KEY})
        assert r.status_code == 200 and "b" in bank


def test_without_admin_both_routes_answer_403_whatever_the_body(bank_and_folders):
    bank, root = bank_and_folders
    with Server(create_app(bank, prompt_root=root)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for path, body in ((LOAD, {"lora_name": "b", "lora_path": str(root / "binary")}),
                           (UNLOAD, {"lora_name": "sentiment"}), (LOAD, {"nonsense": 1})):
            r = client.post(path, json=body)
            assert r.status_code == 403 and error(r)["type"] == "permission_error"
            assert "--admin" in error(r)["message"]
        assert client.put("/v1/prompts/b", json={"path": str(root / "binary")}).status_code == 403
        assert bank.names() == ["sentiment"]
