"""A new task is one file: two tasks defined here, in the test, are served by the engine
and over HTTP with no change to serve/, through their capabilities alone (`word_field`,
`endpoint`) — serving knows no task class or kind name."""

from __future__ import annotations

import httpx
import torch

import softprompt as sp
from softprompt.serve import Engine, PromptBank, Request, create_app
from softprompt.tasks import Task

from conftest import make_bert
from serving import Server


class InputLength(Task):
    """How many tokens the input takes (no head, no forward read): /v1/classify answers it."""

    kind = "input-length"

    def collate(self, model, examples, *, with_targets=True):
        return model.encode(list(examples)), {}

    def predict(self, model, batch, out=None):
        return [{"tokens": int(n)} for n in (batch["field_index"] >= 0).sum(1)]  # (B,) tokens of the fields


class LongWords(Task):
    """Tags each word ``B-LONG`` when it takes more than one token, else ``O``: its input is
    a list of words (`word_field`) and /v1/tag answers it (`endpoint`)."""

    kind = "long-words"
    endpoint = "tag"

    @property
    def word_field(self) -> str:
        return "words"

    def collate(self, model, examples, *, with_targets=True):
        return model.encode(list(examples)), {}

    def predict(self, model, batch, out=None):
        words = batch["word_index"]  # (B, S): the word each token belongs to, -1 elsewhere
        return [["B-LONG" if int((row == w).sum()) > 1 else "O" for w in range(int(row.max()) + 1)] for row in words]


def test_a_task_defined_in_a_test_is_served_by_the_engine_and_over_http(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    base = make_bert(tok).bert.eval()
    bank = PromptBank(base, tok)
    torch.manual_seed(0)
    bank.add("length", sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:3] Text: {text}"), tokenizer=tok),
             task=InputLength())
    bank.add("long", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=2, template="{words}"),
                                        tokenizer=tok), task=LongWords())
    text = "Anna lives in Zzyzx"
    pieces = [tok.tokenize(w) for w in text.split()]
    tags = ["B-LONG" if len(p) > 1 else "O" for p in pieces]
    assert tags == ["O", "O", "O", "B-LONG"] and sum(map(len, pieces)) == 7  # "zzyzx": z ##zy ##z ##x

    engine = Engine(bank)
    results = engine.run([Request("length", text), Request("long", text), Request("length", "a gem")])
    assert [r.output for r in results] == [{"tokens": sum(map(len, pieces))}, tags,
                                           {"tokens": len(tok.tokenize("a gem"))}]
    assert engine.classify("long", [{"words": ["Zzyzx", "Anna"]}]) == [["B-LONG", "O"]]

    with Server(create_app(bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/classify", json={"task": "length", "inputs": [text]})
        assert r.status_code == 200 and r.json() == {"task": "length", "results": [{"tokens": sum(map(len, pieces))}]}
        r = client.post("/v1/tag", json={"task": "long", "inputs": [text]})
        entities = [{"type": "LONG", "start": i, "end": i + 1, "text": w}
                    for i, (w, t) in enumerate(zip(text.split(), tags)) if t == "B-LONG"]
        assert r.status_code == 200
        assert r.json() == {"task": "long", "results": [{"tokens": text.split(), "tags": tags, "entities": entities}]}
        r = client.post("/v1/tag", json={"task": "length", "inputs": [text]})
        assert r.status_code == 422 and "/v1/classify" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"task": "long", "inputs": [text]})
        assert r.status_code == 422 and r.json()["error"]["message"] == "task 'long' has no classification head: use /v1/tag"
