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
def client(causal_bank):
    add(causal_bank, "anchored", sp.PTuningConfig(template="[P:2] Q: {text} A: [P:2]", encoder="mlp",
                                                  encoder_hidden_size=16), seed=4)
    with Server(create_app(causal_bank, max_new_tokens=64)) as server:
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
