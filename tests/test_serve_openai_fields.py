"""OpenAI fields beyond the basics, through the official client against the real server:
``stream_options.include_usage``, ``n`` choices, ``best_of``; each refused by name where
the combination makes no sense."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from softprompt.serve import create_app

from serving import Server
from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def client(causal_bank):
    causal_bank.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        with Server(create_app(causal_bank, max_new_tokens=64)) as server:
            yield OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        causal_bank.tokenizer.chat_template = None


def refused(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def test_include_usage_adds_a_last_chunk_with_the_usage(client):
    whole = client.completions.create(model="writer", prompt=["once upon", "the film"], max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="writer", prompt=["once upon", "the film"], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    chat = list(client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "once upon"}],
                                               max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 4
    plain = list(client.completions.create(model="writer", prompt="x", max_tokens=2, stream=True,
                                           stream_options={"include_usage": False}))
    assert all(c.usage is None for c in plain) and plain[-1].choices


@pytest.mark.parametrize("call, param, message", [
    (lambda c: c.completions.create(model="writer", prompt="x", stream_options={"include_usage": True}),
     "stream_options", "stream_options: only with stream: true"),
    (lambda c: c.completions.create(model="writer", prompt="x", stream=True, stream_options={"include_usgae": True}),
     "stream_options.include_usgae", "stream_options.include_usgae: unknown field (stream_options takes include_usage)"),
    (lambda c: c.completions.create(model="writer", prompt="x", n=0), "n", "n: Input should be greater than or equal to 1"),
    (lambda c: c.completions.create(model="writer", prompt="x", n=3, best_of=2), "best_of",
     "best_of: 2 is less than n (3): best_of is how many completions to choose the n best from"),
    (lambda c: c.completions.create(model="writer", prompt="x", best_of=2, stream=True), "best_of",
     "best_of: cannot be streamed (the best are known only at the end); leave best_of out or stream false")])
def test_bad_combinations_are_refused_by_name(client, call, param, message):
    e = refused(lambda: call(client))
    assert e.param == param and e.body["message"] == message


def test_n_choices_per_prompt_in_openais_order_and_usage(client):
    out = client.completions.create(model="writer", prompt=["once upon", "the film"], max_tokens=5,
                                    temperature=1.0, seed=11, n=3)
    assert [c.index for c in out.choices] == list(range(6))
    texts = [c.text for c in out.choices]
    assert len(set(texts[:3])) > 1  # three draws of one prompt, not one draw three times
    again = client.completions.create(model="writer", prompt=["once upon", "the film"], max_tokens=5,
                                      temperature=1.0, seed=11, n=3)
    assert [c.text for c in again.choices] == texts  # seeded: reproducible choice by choice
    one = client.completions.create(model="writer", prompt="the film", max_tokens=5, temperature=1.0, seed=11)
    assert one.choices[0].text == texts[3]  # choice 0 of a prompt samples with the request's seed
    single = client.completions.create(model="writer", prompt=["once upon", "the film"], max_tokens=5,
                                       temperature=1.0, seed=11)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # each prompt counted once
    assert out.usage.completion_tokens == 30
    chat = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "once upon"}],
                                          max_tokens=4, n=2, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    streamed = list(client.completions.create(model="writer", prompt="once upon", max_tokens=5, temperature=1.0,
                                              seed=11, n=3, stream=True))
    for j in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == j) == texts[j]


def test_best_of_returns_the_n_candidates_of_highest_logprob_per_token(client):
    out = client.completions.create(model="writer", prompt="once upon", max_tokens=6, temperature=1.5, seed=5,
                                    best_of=4, n=2, logprobs=0)
    candidates = client.completions.create(model="writer", prompt="once upon", max_tokens=6, temperature=1.5, seed=5,
                                           n=4, logprobs=0)

    def mean(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    best = sorted(candidates.choices, key=mean, reverse=True)[:2]
    assert [c.text for c in out.choices] == [c.text for c in best] and [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == candidates.usage.completion_tokens  # every candidate was generated
    no_logprobs = client.completions.create(model="writer", prompt="once upon", max_tokens=6, temperature=1.5, seed=5,
                                            best_of=4)
    assert no_logprobs.choices[0].text == best[0].text and no_logprobs.choices[0].logprobs is None


def test_32_concurrent_async_streams_each_equal_the_request_alone(causal_bank, client):
    """32 streamed completions at once through AsyncOpenAI, of two tasks, prompts and budgets
    mixed (greedy), joining one decode as they arrive: each stream's text == the same
    request alone (not streamed), and its usage chunk agrees."""
    import asyncio

    from openai import AsyncOpenAI

    def request(i: int) -> dict:
        return {"model": ("writer", "free")[i % 2], "prompt": ("once upon", "the film was", "a")[i % 3],
                "max_tokens": 3 + i % 7, "temperature": 0}

    alone = [client.completions.create(**request(i)).choices[0].text for i in range(32)]
    aclient = AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0, timeout=60)

    async def one(i: int) -> tuple[str, int]:
        text, usage = "", None
        async for chunk in await aclient.completions.create(**request(i), stream=True,
                                                            stream_options={"include_usage": True}):
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def all_of():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await aclient.close()

    streamed = asyncio.run(all_of())
    assert [t for t, _ in streamed] == alone
    assert all(n <= 3 + i % 7 for i, (_, n) in enumerate(streamed))
