"""OpenAI's presence / frequency penalties and logit_bias: each row's scores are changed
before its token is chosen, by OpenAI's definition (score - frequency * count - presence *
[count > 0] over the row's new tokens, plus its bias), equal to a step-by-step reference of
full forwards; rows alone == rows in a mixed batch, on eager and fixed slots (which do not
step ahead while a penalised row decodes); out-of-range values refused by name."""

from __future__ import annotations

import openai
import pytest
import torch
from openai import OpenAI

import softprompt as sp
from softprompt.encode import PromptBatch
from softprompt.serve import Engine, PromptBank, Request, create_app
from softprompt.serve.decode import Decoder, DecodeRow
from softprompt.serve.sampling import Sampling

from conftest import make_t5
from serving import Server
from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

PROMPT = "the film was"


def reference(model, prompt: str, k: int, presence: float, frequency: float, bias: dict[int, float]) -> list[int]:
    """Greedy tokens by full forwards over the prompt and the tokens so far, each step's
    scores adjusted by OpenAI's formula."""
    enc = model.encode([{"text": prompt}])
    tokens: list[int] = []
    for _ in range(k):
        extra = torch.tensor([tokens], dtype=enc.input_ids.dtype)
        batch = PromptBatch(input_ids=torch.cat([enc.input_ids, extra], 1),
                            attention_mask=torch.cat([enc.attention_mask, torch.ones_like(extra)], 1),
                            prompt_index=torch.cat([enc.prompt_index, torch.full_like(extra, -1)], 1))
        with torch.no_grad():
            scores = model(**batch).logits[0, -1].float()
        for t, b in bias.items():
            scores[t] += b
        for t in set(tokens):
            scores[t] -= frequency * tokens.count(t) + presence
        tokens.append(int(scores.argmax()))
    return tokens


def penalised(k=8, **kw):
    return Sampling(max_new_tokens=k, presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                    logit_bias=tuple(sorted(kw.get("bias", {}).items())))


@pytest.mark.parametrize("graphs", [False, True])
def test_penalised_rows_equal_the_reference_alone_and_in_a_mixed_batch(causal_bank, graphs):
    settings = [dict(presence=0.5, frequency=1.5), dict(frequency=-2.0), dict(bias={11: 5.0, 262: -100.0}),
                dict(presence=2.0, bias={13: 3.0}), dict(frequency=2.0, bias={318: 100.0, 11: 90.0})]
    rows = [DecodeRow(task, {"text": PROMPT}, penalised(**kw)) for task in ("writer", "free") for kw in settings]
    rows.append(DecodeRow("free", {"text": PROMPT}, Sampling(max_new_tokens=8)))  # a plain row beside them
    Decoder(causal_bank, max_rows=4, graphs=graphs).run(rows)
    for row in rows[:-1]:
        kw = settings[rows.index(row) % len(settings)]
        expected = reference(causal_bank[row.task].model, PROMPT, 8, kw.get("presence", 0.0), kw.get("frequency", 0.0),
                             kw.get("bias", {}))
        assert row.tokens == expected, (row.task, kw)
    plain = reference(causal_bank["free"].model, PROMPT, 8, 0.0, 0.0, {})
    assert rows[-1].tokens == plain
    changed = [row.tokens != plain for row in rows[5:10]]
    assert sum(changed) >= 2, changed  # the adjustments changed what was chosen


def test_logit_bias_forces_and_forbids_tokens_and_seeded_penalised_draws_are_batch_independent(causal_bank):
    engine = Engine(causal_bank)
    forced, = engine.run([Request("writer", PROMPT, generate=True, options={"max_new_tokens": 4, "temperature": 0,
                                                                            "logit_bias": {"318": 100}})])
    assert forced.ok and causal_bank.tokenizer(forced.output).input_ids == [318] * 4
    sampled = {"max_new_tokens": 6, "temperature": 1.2, "seed": 9, "frequency_penalty": 1.0, "logit_bias": {"11": -100}}
    alone, = engine.run([Request("free", PROMPT, generate=True, options=sampled)])
    batch = engine.run([Request("writer", "x", generate=True, options={"max_new_tokens": 3}),
                        Request("free", PROMPT, generate=True, options=sampled)])
    assert batch[1].output == alone.output


def test_an_encoder_decoder_task_takes_logit_bias_and_penalties(gpt2_tokenizer):
    t5 = make_t5(gpt2_tokenizer).eval()
    bank = PromptBank(t5, gpt2_tokenizer)
    bank.add("writer", sp.SoftPromptModel(t5, sp.PromptTuningConfig(template="[P:2] {text}"), tokenizer=gpt2_tokenizer))
    engine = Engine(bank)
    forced, free = engine.run([Request("writer", "x", generate=True, options={"max_new_tokens": 3, "temperature": 0,
                                                                              "logit_bias": {"318": 100}}),
                               Request("writer", "x", generate=True, options={"max_new_tokens": 3, "temperature": 0})])
    assert forced.ok and gpt2_tokenizer(forced.output).input_ids == [318] * 3 and free.output != forced.output
    # two tokens biased 10 apart: the leader alone without a penalty; with one, the other as its count grows
    def run(**more):
        return engine.run([Request("writer", "x", generate=True, options={
            "max_new_tokens": 6, "temperature": 0, "logit_bias": {"318": 100, "11": 90}, **more})])[0]

    assert gpt2_tokenizer(run().output).input_ids == [318] * 6
    penalised = gpt2_tokenizer(run(frequency_penalty=2.0).output).input_ids
    assert 11 in penalised and penalised[0] == 318 and penalised.count(318) < 6


@pytest.mark.parametrize("extra, param, message", [
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty: Input should be less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty: Input should be greater than or equal to -2"),
    ({"logit_bias": {"50257": 1}}, "logit_bias",
     "generation option logit_bias: token 50257 is not in the model's vocabulary (ids 0 to 50256)"),
    ({"logit_bias": {"11": 101}}, "logit_bias",
     "generation option logit_bias: 101.0 is out of range: from -100 to 100 (token 11)"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "generation option logit_bias: 'x' is not an integer from 0 to 2147483647")])
def test_out_of_range_penalties_and_biases_are_refused_by_name(causal_bank, extra, param, message):
    with Server(create_app(causal_bank)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="writer", prompt="x", max_tokens=2, extra_body=extra)
    assert caught.value.param == param and caught.value.body["message"] == message
