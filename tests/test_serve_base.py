"""The base model served alone under its own name (`PromptBank.add_base`): its rows are the
text as the base reads it, no prompt, and greedy decoding gives what transformers'
`generate()` gives on the bare base; in one Decoder run with rows of input and deep prompts
(eager or fixed slots), each row equals the row alone. Over HTTP (the real server):
completions and chat on the base's name, /v1/models lists it, admin changes to it and a
task of its name are refused, classify / tag refuse it."""

from __future__ import annotations

import httpx
import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.serve import Engine, PromptBank, create_app, encode_mixed, forward_mixed, generate_mixed
from softprompt.serve.decode import Decoder, DecodeRow, Sampling

from conftest import make_bert
from serving import Server
from test_serve_chat import MESSAGES, RENDERED, TEMPLATE
from test_serve_http import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

BASE = "tiny-llama"
TASKS = {
    "short": lambda: sp.PromptTuningConfig(template="[P:2] {text}", init="vocab"),
    "deep": lambda: sp.PTuningV2Config(num_virtual_tokens=6, template="Q: {text} A:", init_std=0.5),
    "mid": lambda: sp.PTuningConfig(template="{text} [P:3] so", encoder="mlp", encoder_hidden_size=16),
}
TEXTS = ["hi", "a b c d e f g h i j k l m n o p", "the cast holds it together", "ok", "fine then"]


def bank_of(family_models, family="llama", tasks=TASKS, **kwargs):
    base, tok = family_models(family)
    bank = PromptBank(base, tok, **kwargs)
    models = {}
    for name, make in tasks.items():
        torch.manual_seed(len(name))
        models[name] = sp.SoftPromptModel(base, make(), tokenizer=tok).eval()
        bank.add(name, models[name])
    bank.add_base(BASE)
    return bank, models, tok


def base_alone(base, tok, text: str, k: int) -> list[int]:
    """Greedy tokens of transformers' generate() on the bare base, the text tokenized by the
    tokenizer itself (no template, no prompt), cut at the end of sequence."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, do_sample=False,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def task_alone(model, text: str, k: int, eos: int) -> list[int]:
    tokens = model.generate(**model.encode([{"text": text}]), max_new_tokens=k, do_sample=False)[0].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_base_rows_alone_equal_generate_on_the_bare_base(family_models, family):
    bank, _, tok = bank_of(family_models, family, tasks={})
    entry = bank[BASE]
    assert entry.kind == "base" and entry.method is None and entry.template is None and not entry.prompted
    for text in TEXTS:  # the row is exactly the tokenizer's ids of the text
        assert entry.model.encoder.encode({"text": text}).input_ids == tok(text)["input_ids"]
    k = 9
    rows = [DecodeRow(BASE, {"text": x}, Sampling(max_new_tokens=k, eos_token_id=tok.eos_token_id)) for x in TEXTS]
    Decoder(bank, max_rows=8, graphs=False).run(rows)
    for row, text in zip(rows, TEXTS):
        assert row.tokens == base_alone(bank.base, tok, text, k), text
        assert row.tokens and row.error is None
    texts = Engine(bank).generate(BASE, TEXTS[:2], max_new_tokens=k, temperature=0)
    assert texts == [tok.decode(base_alone(bank.base, tok, x, k)) for x in TEXTS[:2]]


@pytest.mark.parametrize("graphs", [False, True])
def test_base_rows_mixed_with_input_and_deep_prompt_rows_equal_each_alone(family_models, graphs):
    """Ten rows of the base and three tasks (input prompts of 2 and 3 slots, a deep prompt
    of 6) through 3 slots, rows joining as others end: each row == the row alone, so the
    base's rows read no table and no prefix position of their neighbours."""
    bank, models, tok = bank_of(family_models, cache_prompts=True)
    eos = tok.eos_token_id
    plan = [(BASE, TEXTS[0], 5), ("deep", TEXTS[1], 7), (BASE, TEXTS[2], 3), ("short", TEXTS[3], 6),
            ("mid", TEXTS[4], 4), (BASE, TEXTS[1], 8), ("deep", TEXTS[0], 2), (BASE, TEXTS[3], 6),
            ("short", TEXTS[2], 3), (BASE, TEXTS[4], 5)]
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=k, eos_token_id=eos)) for t, x, k in plan]
    late = rows[6:]
    decoder = Decoder(bank, max_rows=3, graphs=graphs,
                      admit=lambda room: [late.pop(0) for _ in range(min(room, len(late)))])
    decoder.run(rows[:6])
    assert not late and decoder.steps < sum(k for *_, k in plan)  # rows shared steps
    for row, (task, text, k) in zip(rows, plan):
        want = base_alone(bank.base, tok, text, k) if task == BASE else task_alone(models[task], text, k, eos)
        assert row.tokens == want and row.error is None, (task, text)


def test_mixed_forward_base_row_equals_the_bare_base(family_models):
    bank, models, tok = bank_of(family_models, cache_prompts=False)
    names = [BASE, "deep", "short", BASE, "mid"]
    batch = encode_mixed(bank, names, [{"text": x} for x in TEXTS])
    out = forward_mixed(bank, batch)
    for b in (0, 3):
        ids = tok(TEXTS[b], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = bank.base(input_ids=ids).logits[0]  # (T, V)
        got = out.logits[b][out.attention_mask[b].bool()]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    alone = forward_mixed(bank, encode_mixed(bank, ["deep"], [{"text": TEXTS[1]}]))
    got = out.logits[1][out.attention_mask[1].bool()]
    torch.testing.assert_close(got, alone.logits[0][alone.attention_mask[0].bool()], rtol=1e-4, atol=1e-5)


def test_seq2seq_base_alone_equals_generate(family_models):
    """An encoder-decoder's base rows, alone and beside a deep prompt's rows, give what
    generate() gives on the bare base (the encoder reads the text with no prompt)."""
    base, tok = family_models("t5")
    bank = PromptBank(base, tok)
    bank.add("v2", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}", init_std=0.5),
                                      tokenizer=tok))
    bank.add_base("t5-tiny")
    texts = TEXTS[:3]
    want = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        out = base.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=6,
                            do_sample=False)[0, 1:].tolist()  # without the decoder start token
        want.append(out[: out.index(base.config.eos_token_id) + 1] if base.config.eos_token_id in out else out)
    for names in (["t5-tiny"] * 3, ["t5-tiny", "v2", "t5-tiny", "v2", "t5-tiny"]):
        rows = [texts[i // 2] if n == "t5-tiny" else texts[0] for i, n in enumerate(names)]
        got = generate_mixed(bank, encode_mixed(bank, names, [{"text": x} for x in rows]), max_new_tokens=6,
                             do_sample=False)
        for b, (name, text) in enumerate(zip(names, rows)):
            if name == "t5-tiny":
                expected = want[texts.index(text)]
                assert got[b, : len(expected)].tolist() == expected and expected, (names, b)
    answers = Engine(bank).generate("t5-tiny", texts, max_new_tokens=6, temperature=0)
    assert answers == [tok.decode(w, skip_special_tokens=True) for w in want]


def test_the_base_name_follows_the_task_name_rules_and_is_no_task(family_models, wordpiece_tokenizer):
    bank, models, tok = bank_of(family_models, tasks={"short": TASKS["short"]})
    with pytest.raises(ConfigError, match="served already, as 'tiny-llama'"):
        bank.add_base("other")
    with pytest.raises(ConfigError, match="'tiny-llama' is the base model's name .* cannot be loaded as a task"):
        bank.add(BASE, models["short"])
    with pytest.raises(ConfigError, match="cannot be loaded as a task"):
        bank.add(BASE, models["short"], replace=True)
    with pytest.raises(ConfigError, match="'tiny-llama' is the base model's name .* cannot be removed"):
        bank.remove(BASE)
    assert BASE in bank and bank.names() == ["short", BASE]
    with pytest.raises(SoftPromptError, match="has no task head"):
        Engine(bank).classify(BASE, ["x"])

    base, tok = family_models("llama")
    clash = PromptBank(base, tok)
    clash.add("writer", sp.SoftPromptModel(base, TASKS["short"](), tokenizer=tok))
    with pytest.raises(ConfigError, match="'writer' is a loaded task's name: .*--base-name"):
        clash.add_base("writer")
    with pytest.raises(ConfigError, match="invalid task name '../up'"):
        clash.add_base("../up")
    assert clash.base_name is None
    encoder = make_bert(wordpiece_tokenizer).bert.eval()
    with pytest.raises(ConfigError, match="encoder-only model: it generates no text"):
        PromptBank(encoder, wordpiece_tokenizer).add_base("bert")


def test_max_on_device_counts_prompts_not_the_base(family_models):
    bank, _, _ = bank_of(family_models, max_on_device=1)
    bank.prompts_for([BASE, "short", BASE])
    assert bank.on_device() == ["short"]
    bank.prompts_for(["deep", BASE])
    assert bank.on_device() == ["deep"]
    assert bank.prompts_for([BASE, BASE]).tables is None and bank.prompts_for([BASE]).prefix is None


@pytest.fixture
def chat_bank(causal_bank, monkeypatch):  # noqa: F811
    """test_serve_http's tiny Llama (``review``, ``writer``), the base alone, a chat template."""
    monkeypatch.setattr(causal_bank.tokenizer, "chat_template", TEMPLATE)  # a session's tokenizer: restored
    causal_bank.add_base(BASE)
    return causal_bank


def test_http_completions_and_chat_on_the_base_name(chat_bank):
    bank, tok = chat_bank, chat_bank.tokenizer
    prompt = "a gem of a film"
    want = tok.decode(base_alone(bank.base, tok, prompt, 8))
    assert want
    with Server(create_app(bank, admin=True)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": BASE, "prompt": [prompt, prompt], "max_tokens": 8,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == BASE and [c["text"] for c in body["choices"]] == [want, want]
        assert body["usage"]["prompt_tokens"] == 2 * len(tok(prompt)["input_ids"])
        task = client.post("/v1/completions", json={"model": "writer", "prompt": prompt, "max_tokens": 8,
                                                    "temperature": 0}).json()["choices"][0]["text"]
        assert task != want  # the deep prompt changes what the base writes: the base's rows take none

        chat = client.post("/v1/chat/completions", json={"model": BASE, "messages": MESSAGES, "max_tokens": 6,
                                                         "temperature": 0})
        assert chat.status_code == 200, chat.text
        plain = client.post("/v1/completions", json={"model": BASE, "prompt": RENDERED, "max_tokens": 6,
                                                     "temperature": 0}).json()["choices"][0]["text"]
        # the rendered chat as the base reads a field (special-token text as ordinary tokens)
        ids = tok(RENDERED, split_special_tokens=True, return_tensors="pt")["input_ids"]
        new = bank.base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        new = new[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert chat.json()["choices"][0]["message"]["content"] == plain == tok.decode(new)

        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models[BASE] == {"id": BASE, "object": "model", "owned_by": "softprompt", "method": None,
                                "kind": "base", "num_virtual_tokens": 0, "template": None, "task": None}
        assert models["writer"]["kind"] == "deep" and models["writer"]["method"] == "p-tuning-v2"

        for r in (client.put(f"/v1/prompts/{BASE}", json={"path": "/nowhere"}), client.delete(f"/v1/prompts/{BASE}")):
            assert r.status_code == 409 and r.json()["error"]["param"] == "task", r.text
            assert "is the base model's name (it is served alone, with no prompt)" in r.json()["error"]["message"]
        assert BASE in bank
        r = client.post("/v1/classify", json={"task": BASE, "inputs": ["x"]})
        assert r.status_code == 422 and "has no classification head" in r.json()["error"]["message"]
        r = client.post("/v1/tag", json={"task": BASE, "inputs": ["x"]})
        assert r.status_code == 422 and "not a token-classification task" in r.json()["error"]["message"]
