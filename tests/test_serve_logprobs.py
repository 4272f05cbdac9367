"""Log-probabilities of generated tokens (`logprobs`): the engine's numbers equal a direct
forward of the prompt and the generated tokens through the task's model, row by row in a
mixed batch (a deep prompt and an input prompt, different k); over HTTP in OpenAI's
completion and chat formats through the official client, streamed and not."""

from __future__ import annotations

import openai
import pytest
import torch
from openai import OpenAI

import softprompt as sp
from softprompt.encode import PromptBatch
from softprompt.serve import Engine, PromptBank, Request, create_app

from conftest import make_t5
from serving import Server
from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

PROMPTS = {"writer": "the film was", "free": "once upon a"}


def direct(model, prompt: str, tokens: list[int]) -> torch.Tensor:
    """(N, V) log-softmax of the model's scores for each generated token, from one forward
    over the prompt and the tokens before it (teacher forcing, no cache)."""
    enc = model.encode([{"text": prompt}])
    extra = torch.tensor([tokens[:-1]], dtype=enc.input_ids.dtype)
    batch = PromptBatch(input_ids=torch.cat([enc.input_ids, extra], 1),
                        attention_mask=torch.cat([enc.attention_mask, torch.ones_like(extra)], 1),
                        prompt_index=torch.cat([enc.prompt_index, torch.full_like(extra, -1)], 1))
    with torch.no_grad():
        logits = model(**batch).logits[0, -len(tokens):]  # the prompt's last position on
    return torch.log_softmax(logits.float(), -1)


def test_logprobs_equal_a_direct_forward_row_by_row_in_a_mixed_batch(causal_bank):
    engine = Engine(causal_bank)
    requests = [Request(task, PROMPTS[task], generate=True, options={"max_new_tokens": 6, "temperature": 0,
                                                                     "logprobs": k})
                for task, k in [("writer", 3), ("free", 0), ("writer", 1), ("free", 5)]]
    requests.append(Request("free", PROMPTS["free"], generate=True, options={"max_new_tokens": 6, "temperature": 0}))
    results = engine.run(requests)
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[-1].logprobs is None  # not asked for
    for request, result in zip(requests[:4], results):
        k = request.options["logprobs"]
        tokens = [e.token for e in result.logprobs]
        assert len(tokens) == result.new_tokens == 6
        expected = direct(causal_bank[request.task].model, request.input, tokens)
        got = torch.tensor([e.logprob for e in result.logprobs])
        torch.testing.assert_close(got, expected.gather(1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4, rtol=0)
        for e, row in zip(result.logprobs, expected):
            top = row.topk(k)
            assert [t for t, _ in e.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([lp for _, lp in e.top]), top.values, atol=1e-4, rtol=0)
            assert e.token == row.argmax().item()  # greedy: the chosen token is the most likely


def test_sampled_rows_report_the_raw_models_logprobs_of_their_draws(causal_bank):
    """Temperature and top-k change the draw, not the reported numbers: the model's own."""
    engine = Engine(causal_bank)
    result = engine.run([Request("writer", PROMPTS["writer"], generate=True,
                                 options={"max_new_tokens": 5, "temperature": 1.7, "top_k": 5, "seed": 3,
                                          "logprobs": 2})])[0]
    tokens = [e.token for e in result.logprobs]
    expected = direct(causal_bank["writer"].model, PROMPTS["writer"], tokens)
    torch.testing.assert_close(torch.tensor([e.logprob for e in result.logprobs]),
                               expected.gather(1, torch.tensor(tokens)[:, None])[:, 0], atol=1e-4, rtol=0)


@pytest.fixture
def client(causal_bank):
    with Server(create_app(causal_bank, max_new_tokens=64)) as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completion_logprobs_in_openais_format_streamed_or_not(causal_bank, client):
    engine_logprobs = Engine(causal_bank).run([Request("writer", PROMPTS["writer"], generate=True, options={
        "max_new_tokens": 8, "temperature": 0, "logprobs": 2})])[0].logprobs
    tok = causal_bank.tokenizer
    out = client.completions.create(model="writer", prompt=PROMPTS["writer"], max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([e.token]) for e in engine_logprobs]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in engine_logprobs], abs=1e-5)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for top, token, e in zip(lp.top_logprobs, lp.tokens, engine_logprobs):
        assert token in top and len(top) <= 3  # the 2 best and the chosen one
        assert top[token] == pytest.approx(e.logprob, abs=1e-5)
    streamed = list(client.completions.create(model="writer", prompt=PROMPTS["writer"], max_tokens=8, temperature=0,
                                              logprobs=2, stream=True))
    pieces = [c.choices[0] for c in streamed if c.choices[0].logprobs is not None]
    assert sum((p.logprobs.tokens for p in pieces), []) == lp.tokens
    assert sum((p.logprobs.token_logprobs for p in pieces), []) == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert sum((p.logprobs.text_offset for p in pieces), []) == lp.text_offset
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_chat_logprobs_and_top_logprobs(causal_bank, client):
    causal_bank.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        messages = [{"role": "user", "content": PROMPTS["writer"]}]
        out = client.chat.completions.create(model="writer", messages=messages, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=2)
        content = out.choices[0].logprobs.content
        assert len(content) == out.usage.completion_tokens == 5
        assert "".join(c.token for c in content) == out.choices[0].message.content
        for c in content:
            assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
            assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
            assert bytes(c.bytes).decode() == c.token
        plain = client.chat.completions.create(model="writer", messages=messages, max_tokens=5, temperature=0,
                                               logprobs=True)
        assert [c.top_logprobs for c in plain.choices[0].logprobs.content] == [[]] * 5
        streamed = list(client.chat.completions.create(model="writer", messages=messages, max_tokens=5,
                                                       temperature=0, logprobs=True, top_logprobs=1, stream=True))
        tokens = [c.token for s in streamed if s.choices[0].logprobs for c in s.choices[0].logprobs.content]
        assert tokens == [c.token for c in content]
        none = client.chat.completions.create(model="writer", messages=messages, max_tokens=2)
        assert none.choices[0].logprobs is None
    finally:
        causal_bank.tokenizer.chat_template = None


@pytest.mark.parametrize("call, param, message", [
    (lambda c: c.completions.create(model="writer", prompt="x", logprobs=21), "logprobs",
     "logprobs: Input should be less than or equal to 20"),
    (lambda c: c.chat.completions.create(model="writer", messages=[{"role": "user", "content": "x"}],
                                         top_logprobs=2), "top_logprobs",
     "top_logprobs: give logprobs: true to have log-probabilities returned"),
    (lambda c: c.chat.completions.create(model="writer", messages=[{"role": "user", "content": "x"}],
                                         logprobs=True, top_logprobs=-1), "top_logprobs",
     "top_logprobs: Input should be greater than or equal to 0")])
def test_logprobs_out_of_range_are_refused_by_name(causal_bank, client, call, param, message):
    causal_bank.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            call(client)
    finally:
        causal_bank.tokenizer.chat_template = None
    assert caught.value.param == param and caught.value.body["message"] == message


def test_an_encoder_decoder_task_refuses_logprobs_by_name(gpt2_tokenizer):
    t5 = make_t5(gpt2_tokenizer).eval()
    bank = PromptBank(t5, gpt2_tokenizer)
    bank.add("writer", sp.SoftPromptModel(t5, sp.PromptTuningConfig(template="[P:2] {text}"), tokenizer=gpt2_tokenizer))
    result = Engine(bank).run([Request("writer", "x", generate=True, options={"logprobs": 1})])[0]
    assert not result.ok and result.error.startswith("generation option logprobs: task 'writer' runs on an "
                                                     "encoder-decoder (t5)")


def test_fixed_slots_stepping_ahead_report_the_same_logprobs(causal_bank):
    """The run-ahead step (fixed slots) carries each step's log-probabilities to the rows it
    was launched for: the same entries as eager slots, rows joining as others end."""
    from softprompt.serve.decode import Decoder, DecodeRow, Sampling

    def rows():
        return [DecodeRow(t, {"text": PROMPTS[t]}, Sampling(max_new_tokens=3 + 2 * i, logprobs=i % 3))
                for i, t in enumerate(["writer", "free", "free", "writer", "writer"])]

    fixed, eager = rows(), rows()
    Decoder(causal_bank, max_rows=2, graphs=True).run(fixed)
    for row in eager:
        Decoder(causal_bank, max_rows=1, graphs=False).run([row])
    for a, b in zip(fixed, eager):
        assert len(a.logprobs) == len(a.tokens) == len(b.tokens)
        assert [(e.token, e.top and [t for t, _ in e.top]) for e in a.logprobs] == \
               [(e.token, e.top and [t for t, _ in e.top]) for e in b.logprobs]
        torch.testing.assert_close(torch.tensor([e.logprob for e in a.logprobs]),
                                   torch.tensor([e.logprob for e in b.logprobs]), atol=1e-5, rtol=0)


def test_token_texts_past_the_tokenizer_are_decoded_once(gpt2_tokenizer, monkeypatch):
    """An id past the tokenizer's vocabulary (a model's padded rows) reads what
    ``decode([id])`` gives, decoded once per id however often it comes back; ids in the
    table never call ``decode``."""
    from softprompt.serve import logprobs

    texts = logprobs.token_texts(gpt2_tokenizer)  # built before the spy: the table's own batch decode
    calls = []
    original = type(gpt2_tokenizer).decode
    monkeypatch.setattr(type(gpt2_tokenizer), "decode", lambda self, ids, **kw: calls.append(list(ids)) or original(self, ids, **kw))
    past = len(gpt2_tokenizer) + 7
    text = logprobs._texts_of(gpt2_tokenizer)
    assert [text(past) for _ in range(3)] == [original(gpt2_tokenizer, [past])] * 3
    assert logprobs.token_text(gpt2_tokenizer, past) == original(gpt2_tokenizer, [past])
    assert text(464) == texts[464] == original(gpt2_tokenizer, [464])
    assert calls == [[past]]
