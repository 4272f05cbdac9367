"""``echo`` with ``logprobs`` on /v1/completions (what lm-eval's loglikelihood tasks send:
token ids, ``echo: true, logprobs: 1, max_tokens: 1``), through the official client
against the real server: each of the prompt's own tokens scored as a forward of its task
alone scores it (fp32, CPU, within 1e-4), for an input prompt, a deep prompt and P-tuning
with an anchor, rows of several tasks sharing the forward; never the virtual tokens."""

from __future__ import annotations

import openai
import pytest
import torch
from openai import OpenAI

import softprompt as sp
from softprompt.encode import TokenIds
from softprompt.serve import create_app

from serving import Server
from test_serve_isolation import add, causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

TASKS = ["writer", "free", "anchored"]  # P-tuning v2, prompt tuning, P-tuning with an anchor after the field


@pytest.fixture
def bank(causal_bank):
    """The tasks of `TASKS`."""
    add(causal_bank, "anchored", sp.PTuningConfig(template="[P:2] Q: {text} A: [P:2]", encoder="mlp",
                                                  encoder_hidden_size=16), seed=4)
    return causal_bank


@pytest.fixture
def client(bank):
    with Server(create_app(bank, max_new_tokens=64)) as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def direct(bank, task: str, text: str | TokenIds) -> tuple[list[int], list[float]]:
    """The prompt's field tokens and each one's log-probability (from the second on) by a
    forward of the task's own model over the row alone."""
    model = bank[task].model
    batch = model.encode([{"text": text}])
    with torch.no_grad():
        out = model(**batch)
    fields = out.field_index[0]
    positions = (fields == 0).nonzero().flatten()
    real = batch["input_ids"][0][batch["prompt_index"][0] < 0]  # the real tokens, in the output's order
    ids = real[positions]
    scores = torch.log_softmax(out.logits[0].float(), -1)
    return ids.tolist(), [scores[p - 1, t].item() for p, t in zip(positions[1:].tolist(), ids[1:].tolist())]


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_scores_the_prompts_own_tokens_as_a_forward_of_the_task_alone(client, causal_bank, max_tokens):
    prompts = ["the film was a quiet joy", "once upon a time there", "a b c"]
    for task in TASKS:
        out = client.completions.create(model=task, prompt=prompts, echo=True, logprobs=2, max_tokens=max_tokens,
                                        temperature=0)
        for prompt, choice in zip(prompts, out.choices):
            ids, expected = direct(causal_bank, task, prompt)
            lp = choice.logprobs
            assert choice.text.startswith(prompt)
            assert lp.tokens[: len(ids)] == [causal_bank.tokenizer.decode([t]) for t in ids]
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            got = lp.token_logprobs[1: len(ids)]
            assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (task, got, expected)
            assert all(len(top) <= 3 for top in lp.top_logprobs[1:])  # k = 2 and the token itself
            generated = len(lp.tokens) - len(ids)
            assert generated <= max_tokens and (max_tokens == 0) == (generated == 0)


def test_the_generated_part_equals_the_completion_without_echo(client):
    plain = client.completions.create(model="writer", prompt="the film was", max_tokens=4, logprobs=1, temperature=0)
    echoed = client.completions.create(model="writer", prompt="the film was", max_tokens=4, logprobs=1, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "the film was" + plain.choices[0].text
    n = len(plain.choices[0].logprobs.tokens)
    assert echoed.choices[0].logprobs.token_logprobs[-n:] == plain.choices[0].logprobs.token_logprobs


def test_lm_eval_loglikelihood_request(client, causal_bank):
    """lm-eval's payload: context + continuation as token ids, echo, logprobs 1, max_tokens
    1; it sums token_logprobs[len(context):-1] (the continuation's) and checks greediness
    against top_logprobs."""
    tok = causal_bank.tokenizer
    context, continuation = tok("the film was")["input_ids"], tok(" good")["input_ids"]
    for task in TASKS:
        out = client.completions.create(model=task, prompt=[context + continuation], echo=True, logprobs=1,
                                        max_tokens=1, temperature=0, seed=1234)
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) == len(context) + len(continuation) + 1  # the generated token last
        ids, expected = direct(causal_bank, task, TokenIds(context + continuation))
        assert ids == context + continuation
        assert abs(sum(lp.token_logprobs[len(context):-1]) - sum(expected[len(context) - 1:])) < 1e-4


def test_bad_echo_combinations_are_refused_by_name(client):
    for call, param, message in [
        (lambda: client.completions.create(model="writer", prompt="x", max_tokens=0), "max_tokens",
         "max_tokens: 0 generates nothing"),
        (lambda: client.completions.create(model="writer", prompt="x", echo=True, stream=True), "echo",
         "echo: cannot be streamed here"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["param"] == param and caught.value.body["message"].startswith(message)


def test_rows_of_several_tasks_in_one_engine_run_score_as_each_alone(client, causal_bank):
    from softprompt.serve import Engine, Request

    options = {"max_new_tokens": 1, "temperature": 0, "logprobs": 1}
    requests = [Request(t, p, generate=True, options=options, echo=True)
                for t, p in zip(TASKS * 2, ["the film was", "a b c d e", "once upon", "x y", "the end of it", "q"])]
    mixed = Engine(causal_bank).run(requests)
    for request, result in zip(requests, mixed):
        assert result.ok, result.error
        ids, expected = direct(causal_bank, request.task, request.input)
        assert result.prompt_ids == ids and result.prompt_logprobs[0] is None
        got = [e.logprob for e in result.prompt_logprobs[1:]]
        assert max((abs(a - b) for a, b in zip(got, expected)), default=0.0) < 1e-4


ONE_TOKEN_OPTIONS = [
    {"temperature": 0},
    {"temperature": 1.0, "seed": 7},
    {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3},
    {"temperature": 0, "logit_bias": {"11": 100}},
    {"temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 1.0},
]


@pytest.mark.parametrize("settings", ONE_TOKEN_OPTIONS)
def test_one_new_token_comes_from_the_scoring_forward_as_from_a_prefill(bank, settings):
    """lm-eval's ``max_tokens: 1``: the token after the prompt is picked from the scoring
    forward's next-token scores (no prefill, no decode step) with the row's own sampling
    settings and draw: the same token, log-probabilities and finish as the request without
    echo, whose token a prefill gives, in a mixed batch of tasks."""
    from softprompt.serve import Engine, Request

    texts = ["the film was", "a b c d e", "once upon", "x y", "the end of it", "q"]
    options = {"max_new_tokens": 1, "logprobs": 3, **settings}
    plain = Engine(bank).run([Request(t, p, generate=True, options=options) for t, p in zip(TASKS * 2, texts)])
    engine = Engine(bank)
    echoed = engine.run([Request(t, p, generate=True, options=options, echo=True) for t, p in zip(TASKS * 2, texts)])
    assert engine.decoder.steps == 0  # no prefill ran: the scoring forward answered
    for a, b in zip(plain, echoed):
        assert a.ok and b.ok, (a.error, b.error)
        assert (b.output, b.finish_reason, b.new_tokens) == (a.output, a.finish_reason, a.new_tokens)
        assert [x.token for x in b.logprobs] == [x.token for x in a.logprobs]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        assert [[t for t, _ in x.top] for x in b.logprobs] == [[t for t, _ in x.top] for x in a.logprobs]


def test_a_stop_string_on_the_one_new_token_ends_it_as_a_prefill_would(bank):
    from softprompt.serve import Engine, Request

    first = Engine(bank).run([Request("writer", "the film was", generate=True,
                                             options={"max_new_tokens": 1, "temperature": 0})])[0]
    options = {"max_new_tokens": 1, "temperature": 0, "logprobs": 1, "stop": [first.output[-1:]]}
    plain, echoed = (Engine(bank).run([Request("writer", "the film was", generate=True, options=options,
                                                      echo=echo)])[0] for echo in (False, True))
    assert plain.ok and echoed.ok and first.output
    assert (echoed.output, echoed.finish_reason) == (plain.output, plain.finish_reason) == (first.output[:-1], "stop")


def _gemma2(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=0.5, pad_token_id=tok.pad_token_id))


def _granite(tok):
    from transformers import GraniteConfig, GraniteForCausalLM
    return GraniteForCausalLM(GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            logits_scaling=4.0, pad_token_id=tok.pad_token_id))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "gemma2", "granite"])
def test_the_lm_head_at_chosen_positions_gives_the_models_own_scores(family, family_models, gpt2_tokenizer):
    """Scoring applies the LM head only at the positions it scores (`loss.lm_head`):
    its scores equal the model's own logits there, final soft cap and scales included."""
    from softprompt.loss import lm_head

    torch.manual_seed(0)
    if family in ("gemma2", "granite"):
        model = (_gemma2 if family == "gemma2" else _granite)(gpt2_tokenizer).eval()
    else:
        model, _ = family_models(family)
    ids = torch.randint(0, len(gpt2_tokenizer), (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        ours = lm_head(model, out.hidden_states[-1])
    torch.testing.assert_close(ours, out.logits, rtol=1e-5, atol=1e-5)
    if family in ("gemma2", "granite"):  # the scaling is applied: the bare head differs
        assert not torch.allclose(model.get_output_embeddings()(out.hidden_states[-1]), out.logits, atol=1e-3)


def test_scores_taken_a_chunk_at_a_time_equal_one_chunk(causal_bank, monkeypatch):
    from softprompt.serve import scoring

    rows = [(causal_bank["writer"], causal_bank["writer"].model.encoder.encode({"text": t}))
            for t in ["the film was a quiet joy", "a b c"]]
    whole = scoring.score_prompts(causal_bank, rows, 2)
    monkeypatch.setattr(scoring, "CHUNK_SCORES", causal_bank.vocabulary_size * 3)  # 3 positions per chunk
    chunked = scoring.score_prompts(causal_bank, rows, 2)
    assert chunked.prompt == whole.prompt and len(whole.prompt[0]) > 4
    torch.testing.assert_close(chunked.next_token, whole.next_token)


def test_a_completion_body_reads_the_same_with_orjson_and_json(monkeypatch):
    """`FastJSON` writes with orjson (the serve extra's) and with json where it is missing:
    the same document either way (non-ASCII text, floats, nulls, nesting)."""
    import json

    from softprompt.serve import openai_api

    body = {"choices": [{"text": "café ✓ \\u0000", "logprobs": {"tokens": ["a", "é"], "token_logprobs": [None, -0.1],
                                                              "top_logprobs": [None, {"é": -0.1, "e": -2.5e-7}]}}],
            "usage": {"prompt_tokens": 3}}
    assert openai_api.orjson is not None  # the serve extra is installed for the tests
    fast = openai_api.FastJSON(body).body
    monkeypatch.setattr(openai_api, "orjson", None)
    plain = openai_api.FastJSON(body).body
    assert json.loads(fast) == json.loads(plain) == body


@pytest.mark.parametrize("k, batch_k", [(1, 1), (1, 3), (2, 3), (0, 2)])
def test_echo_logprobs_read_from_the_batch_copy_equal_those_of_each_entry(causal_bank, k, batch_k):
    """The API's ``logprobs`` written from the scores as they lie in the batch's host copy
    (`PromptLogprobs`, the row's own k of the batch's) equal those written entry by entry."""
    from softprompt.serve.logprobs import echo_logprobs
    from softprompt.serve.scoring import PromptLogprobs

    ids = [11, 250, 7, 4000, 13]
    table = [[0.0] * 9] + [[-0.5 * j] + [-0.1 * t for t in range(batch_k)] + [float(100 + j + t) for t in range(batch_k)]
                           for j in range(1, 5)]  # a row of another prompt first: this one starts at 1
    scores = PromptLogprobs(ids, [row[: 1 + 2 * batch_k] for row in table], 1, batch_k).with_k(k)
    entries = list(scores)
    assert entries[0] is None and len(entries[1].top) == k
    tok = causal_bank.tokenizer
    assert echo_logprobs(tok, ids, scores, []) == echo_logprobs(tok, ids, entries, [])
