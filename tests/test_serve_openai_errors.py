"""Errors as the official ``openai`` client sees them: the real server (uvicorn on
loopback, a tiny Llama with two tasks) answers each mistake in OpenAI's error body, so the
client raises the exception of its status with the server's message, param and code
(with FastAPI's ``{"detail": ...}`` it showed only "Error code: 404")."""

from __future__ import annotations

import threading

import openai
import pytest
from openai import OpenAI

from softprompt.serve import Engine, Result, create_app
from softprompt.serve.request import ErrorKind

from serving import Server
from test_serve_http import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)


@pytest.fixture
def bank(request):
    """Two tasks on a tiny Llama: ``review`` (a verbalizer) and ``writer`` (completions)."""
    return request.getfixturevalue("causal_bank")


@pytest.fixture
def client(bank):
    with Server(create_app(bank, max_inputs=2, max_new_tokens=8, api_key="sk-right")) as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="sk-right", max_retries=0, timeout=30)


def refused(call, kind):
    """The exception `call` raises, checked to be `kind` (an ``openai`` error class)."""
    with pytest.raises(kind) as caught:
        call()
    return caught.value


def test_an_unknown_model_is_not_found_and_the_message_lists_the_loaded_tasks(client):
    e = refused(lambda: client.completions.create(model="nope", prompt="once", max_tokens=2), openai.NotFoundError)
    assert e.status_code == 404
    assert e.body == {"message": "unknown task 'nope'; loaded tasks: review, writer", "type": "invalid_request_error",
                      "param": "model", "code": "model_not_found"}
    assert "unknown task 'nope'; loaded tasks: review, writer" in e.message
    assert (e.param, e.code, e.type) == ("model", "model_not_found", "invalid_request_error")


def test_a_bad_temperature_is_a_bad_request_naming_the_field(client):
    e = refused(lambda: client.completions.create(model="writer", prompt="once", temperature=3.5),
                openai.BadRequestError)
    assert e.status_code == 400 and e.param == "temperature"
    assert e.body["message"] == "temperature: Input should be less than or equal to 2"
    e = refused(lambda: client.completions.create(model="writer", prompt="once", temperature=1e-45, max_tokens=2),
                openai.BadRequestError)  # in range for the schema, refused by the sampler's own check
    assert e.param == "temperature" and "0 (greedy)" in e.body["message"]
    e = refused(lambda: client.completions.create(model="writer", prompt="once", max_tokens=9), openai.BadRequestError)
    assert e.param == "max_tokens" and e.body["message"] == "max_tokens: 9 is over the server's limit of 8"


@pytest.mark.parametrize("field, value, takes", [("suffix", "!", "null"), ("suffix", 0, "null")])  # 0 is not null
def test_an_openai_field_softprompt_does_not_implement_is_refused_by_name(client, field, value, takes):
    e = refused(lambda: client.completions.create(model="writer", prompt="once", max_tokens=2,
                                                  extra_body={field: value}), openai.BadRequestError)
    assert e.status_code == 400 and e.param == field
    assert e.body["message"] == f"{field}: softprompt does not implement {field} (it takes only {takes})"


def test_echo_takes_a_boolean_only(client):
    e = refused(lambda: client.completions.create(model="writer", prompt="once", max_tokens=2, extra_body={"echo": 0}),
                openai.BadRequestError)  # 0 is not false
    assert e.param == "echo" and e.body["message"] == "echo: Input should be a valid boolean"


def test_fields_sent_with_the_value_that_asks_for_nothing_are_taken(client):
    """A client that does not use a field may still send its neutral value (0 penalties,
    echo false, n 1, a user): that asks for nothing softprompt lacks."""
    answer = client.completions.create(model="writer", prompt="once", max_tokens=2, temperature=0, n=1, echo=False,
                                       presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="u-1")
    assert answer.choices[0].finish_reason in ("length", "stop") and answer.usage.completion_tokens >= 1


def test_an_unknown_field_is_refused_by_name(client):
    e = refused(lambda: client.completions.create(model="writer", prompt="once", extra_body={"temprature": 0}),
                openai.BadRequestError)
    assert e.param == "temprature"
    assert e.body["message"] == ("temprature: unknown field (this request takes model, prompt, max_tokens, "
                                 "temperature, top_p, stop, stream, seed, n, user, stream_options, presence_penalty, "
                                 "frequency_penalty, logit_bias, echo, logprobs, best_of)")


def test_a_wrong_api_key_is_an_authentication_error_with_its_message(bank, client):
    wrong = client.with_options(api_key="sk-wrong")
    e = refused(lambda: wrong.completions.create(model="writer", prompt="once"), openai.AuthenticationError)
    assert e.status_code == 401
    assert e.body == {"message": "missing or wrong API key (Authorization: Bearer <key>)",
                      "type": "authentication_error", "param": None, "code": "invalid_api_key"}
    e = refused(lambda: wrong.models.list(), openai.AuthenticationError)  # every path, not only completions
    assert e.code == "invalid_api_key"


def test_too_many_prompts_and_an_over_long_prompt_get_413_naming_the_prompt(client):
    e = refused(lambda: client.completions.create(model="writer", prompt=["a", "b", "c"]), openai.APIStatusError)
    assert e.status_code == 413 and e.param == "prompt" and e.type == "invalid_request_error"
    assert e.body["message"] == "3 prompts in one request; the server takes at most 2"
    for stream in (False, True):  # a stream that fails before its first piece: the same answer
        e = refused(lambda: client.completions.create(model="writer", prompt=["fine", "word " * 100], max_tokens=2,
                                                      stream=stream), openai.APIStatusError)
        assert e.status_code == 413 and e.param == "prompt[1]", (stream, e.body)
        assert e.body["message"].startswith("prompt 1: ") and "over the limit of 61" in e.body["message"], e.body


def test_softprompts_own_endpoints_answer_in_the_same_shape(client):
    """/v1/classify through the client's plain ``post``: a task without a head is 422
    (the request is well formed; the task cannot answer it), an unknown path 404."""
    e = refused(lambda: client.post("/classify", body={"task": "writer", "inputs": ["x"]}, cast_to=object),
                openai.UnprocessableEntityError)
    assert e.status_code == 422 and e.param == "task"
    assert e.body["message"] == "task 'writer' has no classification head: use /v1/completions"
    e = refused(lambda: client.post("/nowhere", body={}, cast_to=object), openai.NotFoundError)
    assert e.body == {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}


class FailsMidStream(Engine):
    """Sends one piece of each prompt, waits until the client has read it, then fails the
    run: the stream has begun (200), so the error can only be an event."""

    def __init__(self, bank):
        super().__init__(bank)
        self.read = threading.Event()

    def run(self, requests, admit=None):
        for r in requests:
            r.stream.on_text("once", None)
        self.read.wait(timeout=30)
        return [Result(r.task, error="the run failed: out of memory", error_kind=ErrorKind.FAILED) for r in requests]


def test_a_stream_that_fails_after_its_first_piece_ends_with_an_error_event_the_client_raises(bank):
    engine = FailsMidStream(bank)
    with Server(create_app(bank, engine=engine)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
        stream = client.completions.create(model="writer", prompt="x", max_tokens=4, stream=True)
        assert next(iter(stream)).choices[0].text == "once"
        engine.read.set()
        with pytest.raises(openai.APIError) as caught:
            list(stream)
    assert caught.value.message == "prompt 0: the run failed: out of memory"
    assert caught.value.body == {"message": "prompt 0: the run failed: out of memory", "type": "server_error",
                                 "param": "prompt[0]", "code": None}
