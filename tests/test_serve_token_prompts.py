"""Completion prompts as token ids (OpenAI's list-of-ints forms; lm-eval's default), through
the official client against the real server: the same answer as the text they tokenize
to, for an input prompt, a deep prompt and P-tuning with an anchor, alone or mixed with
text prompts; a bad id, or a template with no one place for ids, refused by name."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from softprompt.encode import TokenIds
from softprompt.serve import Engine, Request, create_app

from serving import Server
from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)


@pytest.fixture
def client(causal_bank):
    with Server(create_app(causal_bank, max_new_tokens=64)) as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def ids_of(bank, text: str) -> list[int]:
    return bank.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task", ["writer", "free"])
def test_token_ids_complete_as_the_text_they_tokenize_to(client, causal_bank, task):
    texts = ["once upon a time", "the film was"]
    ids = [ids_of(causal_bank, t) for t in texts]
    by_text = client.completions.create(model=task, prompt=texts, max_tokens=6, temperature=0, logprobs=2)
    by_ids = client.completions.create(model=task, prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert [c.logprobs.token_logprobs for c in by_ids.choices] == [c.logprobs.token_logprobs for c in by_text.choices]
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens
    one = client.completions.create(model=task, prompt=ids[1], max_tokens=6, temperature=0)  # a single list of ids
    assert one.choices[0].text == by_text.choices[1].text


def test_token_ids_beside_text_in_one_batch_equal_each_alone(causal_bank):
    """In a batch mixed with text rows of other tasks, an id row equals the text row alone."""
    ids = ids_of(causal_bank, "the film was")
    options = {"max_new_tokens": 5, "temperature": 0}
    mixed = Engine(causal_bank).run([Request("writer", TokenIds(ids), generate=True, options=options),
                                     Request("free", "a long time ago there", generate=True, options=options),
                                     Request("writer", "the film was", generate=True, options=options)])
    alone = Engine(causal_bank).run([Request("writer", "the film was", generate=True, options=options)])[0]
    assert all(r.ok for r in mixed), [r.error for r in mixed]
    assert mixed[0].output == alone.output == mixed[2].output


def refused(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def test_an_id_outside_the_vocabulary_is_named_by_its_place(client, causal_bank):
    size = causal_bank.vocabulary_size
    e = refused(lambda: client.completions.create(model="writer", prompt=[[1, 2], [3, size, 4]], max_tokens=2))
    assert e.body["param"] == "prompt[1][1]"
    assert e.body["message"] == f"prompt[1][1]: id {size} is outside the vocabulary (0 to {size - 1})"
    e = refused(lambda: client.completions.create(model="writer", prompt=[5, -1], max_tokens=2))
    assert e.body["param"] == "prompt[1]" and "id -1 is outside the vocabulary" in e.body["message"]


def test_ids_for_a_template_of_several_fields_are_refused_saying_why(causal_bank):
    import softprompt as sp
    from test_serve_isolation import add

    add(causal_bank, "pair", sp.PromptTuningConfig(template="[P:2] {premise} ? {hypothesis}"), seed=3)
    with Server(create_app(causal_bank)) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        e = refused(lambda: client.completions.create(model="pair", prompt=[1, 2, 3], max_tokens=2))
    assert e.body["param"] == "prompt"
    assert e.body["message"] == ("prompt[0]: token ids fill a template's one text field; task 'pair' has template "
                                 "fields ['premise', 'hypothesis']: send an object of texts")


def test_a_mixed_list_and_booleans_are_not_token_ids(client):
    e = refused(lambda: client.completions.create(model="writer", prompt=[1, "x"], max_tokens=2))
    assert e.body["param"].startswith("prompt")
    e = refused(lambda: client.completions.create(model="writer", prompt=[True, 2], max_tokens=2))
    assert e.body["param"].startswith("prompt")


def test_usage_counts_the_prompts_own_tokens_and_the_virtual_tokens_apart(client, causal_bank):
    """``prompt_tokens`` is what a client's tokenizer counts of the prompt (the templates
    here add no text); ``virtual_tokens``: 4 slots in the row for `free` (prompt tuning,
    [P:4]), 3 per layer for `writer` (P-tuning v2)."""
    ids = ids_of(causal_bank, "the film was")
    for task, virtual in (("free", 4), ("writer", 3)):
        out = client.completions.create(model=task, prompt=["the film was", "the film was"], max_tokens=3,
                                        temperature=0)
        assert out.usage.prompt_tokens == 2 * len(ids)
        assert out.usage.model_extra["virtual_tokens"] == 2 * virtual
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
