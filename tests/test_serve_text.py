"""The one parser of generation options, and the error kind -> status code table."""

from __future__ import annotations

import pytest

from softprompt.errors import SoftPromptError
from softprompt.serve import ErrorKind, GenerationOptions
from softprompt.serve.app import STATUS


def test_generation_options_parse_check_and_convert():
    options = GenerationOptions.parse({"max_new_tokens": "8", "temperature": 0, "stop": ["\n", ""], "seed": 3})
    assert options == GenerationOptions(max_new_tokens=8, temperature=0.0, stop=("\n",), seed=3)
    assert GenerationOptions.parse({"stop": "."}).stop == (".",) and GenerationOptions.parse({"stop": None}).stop == ()
    assert GenerationOptions.parse(options) is options
    with pytest.raises(SoftPromptError, match=r"unknown generation option\(s\) \['beams'\]"):
        GenerationOptions.parse({"beams": 3})
    with pytest.raises(SoftPromptError, match=r"unknown generation option\(s\) \['eos_token_id'\]"):
        GenerationOptions.parse({"eos_token_id": 2})  # a task's setting, not a request's
    with pytest.raises(SoftPromptError, match="temperature: 'hot' is not a float"):
        GenerationOptions.parse({"temperature": "hot"})


def test_generation_options_for_generate_and_for_the_decoder():
    greedy = GenerationOptions.parse({"max_new_tokens": 4, "temperature": 0})
    assert greedy.generate_kwargs() == {"max_new_tokens": 4, "do_sample": False}  # temperature 0: no temperature
    warm = GenerationOptions.parse({"temperature": 0.7, "top_p": 0.9})
    assert warm.generate_kwargs() == {"temperature": 0.7, "top_p": 0.9, "do_sample": True}
    task = GenerationOptions.parse({"max_new_tokens": 5, "do_sample": False, "eos_token_id": 7},
                                   known=("max_new_tokens", "do_sample", "eos_token_id"))
    assert task.generate_kwargs() == {"max_new_tokens": 5, "do_sample": False, "eos_token_id": 7}
    s = warm.sampling(eos=2)
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.top_k, s.top_p, s.eos_token_id) == (16, True, 0.7, 0, 0.9, 2)
    s = task.sampling(eos=2)
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.eos_token_id) == (5, False, 1.0, 7)


def test_a_completion_request_drops_a_top_p_that_filters_nothing():
    assert GenerationOptions.completion(16, 1.0, 1.0, None, None) == GenerationOptions(max_new_tokens=16, temperature=1.0)
    assert GenerationOptions.completion(16, 0.0, 0.5, "x", 1).top_p is None
    assert GenerationOptions.completion(16, 0.8, 0.5, ["x"], 1) == GenerationOptions(
        max_new_tokens=16, temperature=0.8, top_p=0.5, stop=("x",), seed=1)


def test_every_error_kind_has_its_status_code():
    assert STATUS == {ErrorKind.UNKNOWN_TASK: 404, ErrorKind.INPUT_TOO_LONG: 413, ErrorKind.BAD_INPUT: 422,
                      ErrorKind.FAILED: 500, ErrorKind.CANCELLED: 499, ErrorKind.SHUTTING_DOWN: 503}
