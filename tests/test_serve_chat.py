"""POST /v1/chat/completions through the official ``openai`` client against the real
server (uvicorn on loopback, a tiny Llama with two tasks, a small chat template set on
its tokenizer): a chat is the completion of its rendered messages, streamed or not."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from softprompt.errors import SoftPromptError
from softprompt.serve import create_app
from softprompt.serve.chat import render_chat

from serving import Server
from test_serve_http import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

#: a small template that writes the BOS as text, as Llama 3's does
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a gem of a film"}]
#: what TEMPLATE renders MESSAGES to (after the BOS text: the test tokenizer adds no BOS, so it stays)
TURNS = "<|system|>be brief\n<|user|>a gem of a film\n<|assistant|>"
RENDERED = "<|endoftext|>" + TURNS


@pytest.fixture
def bank(request):
    """``review`` (a verbalizer) and ``writer`` (completions); the tokenizer has TEMPLATE
    for the test (the tokenizer fixture is shared by the session: restored after)."""
    bank = request.getfixturevalue("causal_bank")
    before = bank.tokenizer.chat_template
    bank.tokenizer.chat_template = TEMPLATE
    yield bank
    bank.tokenizer.chat_template = before


@pytest.fixture
def server(bank):
    with Server(create_app(bank, max_new_tokens=64)) as server:
        yield server


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_render_chat_drops_the_bos_text_only_where_the_encoder_adds_the_bos(bank):
    tok = bank.tokenizer
    assert tok.bos_token == "<|endoftext|>" and bank["writer"].model.encoder.lead == []
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    assert render_chat(tok, MESSAGES, []) == RENDERED  # no BOS from the encoder: the template's is the one
    assert render_chat(tok, MESSAGES, [tok.bos_token_id]) == TURNS  # the encoder's BOS, not a second one
    assert render_chat(tok, MESSAGES, [tok.bos_token_id + 1]) == RENDERED  # some other lead token
    tok.chat_template = None
    with pytest.raises(SoftPromptError, match="no chat template"):
        render_chat(tok, MESSAGES, [])
    tok.chat_template = "{{ raise_exception('turns must alternate') }}"
    with pytest.raises(SoftPromptError, match="turns must alternate"):
        render_chat(tok, MESSAGES, [])


def test_a_chat_is_the_completion_of_its_rendered_messages(client):
    chat = client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=6, temperature=0)
    plain = client.completions.create(model="writer", prompt=RENDERED, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "writer"
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.message.content == plain.choices[0].text
    assert choice.finish_reason == plain.choices[0].finish_reason and choice.logprobs is None
    assert choice.message.content  # the tiny model writes something in 6 tokens
    # the same prompt tokens as the rendered text completed (nothing added or lost on the way)
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens > 0
    assert chat.usage.completion_tokens == plain.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    again = client.chat.completions.create(model="writer", messages=MESSAGES, max_completion_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_a_streamed_chat_is_the_whole_chat_in_pieces(client, server):
    whole = client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    pieces = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert all(pieces) and "".join(pieces) == whole.choices[0].message.content
    last = chunks[-1].choices[0]
    assert last.finish_reason == whole.choices[0].finish_reason and last.delta.content is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    body = {"model": "writer", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["delta"] == {}


def test_a_seeded_sampled_chat_is_reproducible(client):
    def chat(seed):
        return client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first = chat(7)
    assert chat(7) == first
    plain = client.completions.create(model="writer", prompt=RENDERED, max_tokens=12, temperature=1.0, seed=7)
    assert plain.choices[0].text == first  # the same draws as the completion of the rendered prompt
    assert any(chat(s) != first for s in (8, 9, 10))


def test_a_stop_string_ends_the_chat(client):
    whole = client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert len(text) >= 4
    stop = text[len(text) // 2]
    cut = client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_tokenizer_without_a_chat_template_is_a_bad_request_naming_messages(client, bank):
    bank.tokenizer.chat_template = None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=2)
    assert caught.value.param == "messages" and "has no chat template" in caught.value.body["message"]


def test_bad_messages_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=[{"role": "robot", "content": "hi"}], max_tokens=2)
    assert caught.value.param == "messages[0].role" and "system" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=[], max_tokens=2)
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi", "x": 1}])
    assert caught.value.param == "messages[0].x"


@pytest.mark.parametrize("field, value, takes", [
    ("tool_choice", "auto", 'null or "none"'),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "null or []"),
    ("response_format", {"type": "json_object"}, 'null or {"type": "text"}')])
def test_an_unimplemented_chat_field_is_refused_by_name(client, field, value, takes):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=2, **{field: value})
    assert caught.value.param == field
    assert caught.value.body["message"] == f"{field}: softprompt does not implement {field} (it takes only {takes})"


def test_neutral_values_and_unknown_fields(client):
    chat = client.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=2, temperature=0,
                                          logprobs=False, presence_penalty=0, n=1, user="u")
    assert chat.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=MESSAGES, extra_body={"temprature": 0})
    assert caught.value.param == "temprature" and "unknown field" in caught.value.body["message"]
    assert "messages" in caught.value.body["message"] and "tools" not in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="writer", messages=MESSAGES, max_completion_tokens=65)
    assert caught.value.param == "max_completion_tokens"


def test_a_classify_task_answers_chat_as_it_answers_completions(client):
    """/v1/completions generates through a classify task's template (up to its [MASK]);
    chat does the same with the rendered messages in the task's one field."""
    chat = client.chat.completions.create(model="review", messages=MESSAGES, max_tokens=4, temperature=0)
    plain = client.completions.create(model="review", prompt=RENDERED, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens


def test_concurrent_streamed_chats_each_equal_the_chat_alone(client, server):
    chats = [[{"role": "user", "content": f"review number {i}: " + "great " * i}] for i in range(8)]
    alone = [client.chat.completions.create(model="writer", messages=m, max_tokens=8, temperature=0)
             .choices[0].message.content for m in chats]

    async def streamed(aclient, messages):
        stream = await aclient.chat.completions.create(model="writer", messages=messages, max_tokens=8,
                                                       temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_at_once():
        aclient = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(streamed(aclient, m) for m in chats))
        finally:
            await aclient.close()

    together = asyncio.run(all_at_once())
    assert together == alone and len(set(alone)) > 1


def test_a_chat_too_long_for_the_model_is_refused_naming_messages_streamed_or_not(client):
    messages = [{"role": "user", "content": "word " * 3000}]
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="writer", messages=messages, max_tokens=2, stream=stream)
        assert caught.value.status_code == 413 and caught.value.param == "messages"
        assert caught.value.body["message"].startswith("messages: ")
