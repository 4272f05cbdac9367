"""The one parser of generation options, and the error kind -> status code table."""

from __future__ import annotations

import pytest

from softprompt.errors import SoftPromptError
from softprompt.serve import ErrorKind, GenerationOptions
from softprompt.serve.text import MAX_TEMPERATURE, MIN_TEMPERATURE, TASK_OPTIONS
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
    with pytest.raises(SoftPromptError, match="temperature: 'hot' is not a number: 0 \\(greedy\\) or from 0.001 to 100"):
        GenerationOptions.parse({"temperature": "hot"})


def refused(**options) -> str:
    with pytest.raises(SoftPromptError) as caught:
        GenerationOptions.parse(options, known=TASK_OPTIONS)
    return str(caught.value)


def test_every_sampling_option_is_range_checked_with_a_message_naming_it():
    # seeds: 64 bits, signed or not (a negative one mod 2**64); the old parser let 2**70 reach torch.manual_seed
    assert "seed: 1180591620717411303424 is out of range: an integer from -9223372036854775808 to " \
           "18446744073709551615" in refused(seed=2**70)
    assert "seed: -9223372036854775809 is out of range" in refused(seed=-(2**63) - 1)
    assert GenerationOptions.parse({"seed": 2**64 - 1}).seed == 2**64 - 1
    assert GenerationOptions.parse({"seed": -1}).seed == 2**64 - 1
    assert GenerationOptions.parse({"seed": 7.0}).seed == GenerationOptions.parse({"seed": "7"}).seed == 7
    assert "seed: 7.5 is not an integer" in refused(seed=7.5)
    assert "seed: True is not an integer" in refused(seed=True)  # bools are not numbers
    assert "seed: inf is not an integer" in refused(seed=float("inf"))
    # temperature: 0 (greedy) or a numerically safe range; 1e-45 turned every logit into inf
    assert "temperature: 1e-45 is out of range: 0 (greedy) or from 0.001 to 100.0; send 0 for greedy decoding" \
           in refused(temperature=1e-45)
    assert GenerationOptions.parse({"temperature": MIN_TEMPERATURE}).temperature == MIN_TEMPERATURE
    assert GenerationOptions.parse({"temperature": MAX_TEMPERATURE}).temperature == MAX_TEMPERATURE
    for bad in (float("nan"), float("inf"), float("-inf"), -0.5, 101, "nan", 10**400):
        assert "generation option temperature:" in refused(temperature=bad), bad
    assert "temperature: True is not a number" in refused(temperature=True)
    # top_p in (0, 1]; top_k and counts: integers
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), float("inf")):
        assert "top_p:" in refused(top_p=bad) and "above 0 and at most 1" in refused(top_p=bad), bad
    assert GenerationOptions.parse({"top_p": 1}).top_p == 1.0
    assert "top_k: -1 is out of range: an integer from 0 to 2147483647" in refused(top_k=-1)
    assert "top_k: 2.5 is not an integer" in refused(top_k=2.5) and "top_k:" in refused(top_k=2**31)
    assert "max_new_tokens: 0 is out of range: an integer from 1 to" in refused(max_new_tokens=0)
    assert "max_new_tokens: False is not an integer" in refused(max_new_tokens=False)
    assert "eos_token_id: -1 is out of range" in refused(eos_token_id=-1)
    assert "do_sample: 'yes' is not true or false" in refused(do_sample="yes")
    assert "do_sample: true with temperature 0" in refused(do_sample=True, temperature=0)
    assert len(refused(seed="9" * 500)) < 400  # a huge value is cut short in the message


def test_stop_strings_empty_ones_ignored_alike_and_capped():
    assert GenerationOptions.parse({"stop": ""}).stop == GenerationOptions.parse({"stop": [""]}).stop == ()
    assert GenerationOptions.parse({"stop": ["a", "", "b", "c"]}).stop == ("a", "b", "c")
    assert "stop: 5 stop strings; at most 4" in refused(stop=["a", "b", "c", "d", "e"])
    assert "stop: item 1 has 257 characters; at most 256" in refused(stop=["a", "x" * 257])
    assert "stop: item 0 (3) is not a string" in refused(stop=[3])
    assert "stop: {'a': 1} is not a string or a list of strings" in refused(stop={"a": 1})


def test_generation_options_for_generate_and_for_the_decoder():
    greedy = GenerationOptions.parse({"max_new_tokens": 4, "temperature": 0})
    assert greedy.generate_kwargs() == {"max_new_tokens": 4, "do_sample": False}
    warm = GenerationOptions.parse({"temperature": 0.7, "top_p": 0.9, "seed": 5})
    assert warm.generate_kwargs() == {"do_sample": False}  # generate runs greedy: rows sample in a RowSampler
    task = GenerationOptions.parse({"max_new_tokens": 5, "do_sample": False, "eos_token_id": 7},
                                   known=("max_new_tokens", "do_sample", "eos_token_id"))
    assert task.generate_kwargs() == {"max_new_tokens": 5, "do_sample": False, "eos_token_id": 7}
    assert (warm.batch_key, greedy.batch_key, task.batch_key) == ((None, None), (4, None), (5, 7))
    s = warm.sampling(eos=2)
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.top_k, s.top_p, s.eos_token_id, s.seed) == \
           (16, True, 0.7, 0, 0.9, 2, 5)
    s = task.sampling(eos=2)
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.eos_token_id) == (5, False, 1.0, 7)
    # no seed: fresh entropy for every row (64 bits), never a shared or predictable stream
    seeds = {greedy.sampling(eos=2).seed for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= seed < 2**64 for seed in seeds)


def test_a_completion_request_drops_a_top_p_that_filters_nothing():
    assert GenerationOptions.completion(16, 1.0, 1.0, None, None) == GenerationOptions(max_new_tokens=16, temperature=1.0)
    assert GenerationOptions.completion(16, 0.0, 0.5, "x", 1).top_p is None
    assert GenerationOptions.completion(16, 0.8, 0.5, ["x"], 1) == GenerationOptions(
        max_new_tokens=16, temperature=0.8, top_p=0.5, stop=("x",), seed=1)
    with pytest.raises(SoftPromptError, match="top_p: nan"):  # checked even where greedy decoding drops it
        GenerationOptions.completion(16, 0.0, float("nan"), None, None)


def test_every_error_kind_has_its_status_code():
    assert STATUS == {ErrorKind.UNKNOWN_TASK: 404, ErrorKind.INPUT_TOO_LONG: 413, ErrorKind.BAD_INPUT: 422,
                      ErrorKind.FAILED: 500, ErrorKind.CANCELLED: 499, ErrorKind.SHUTTING_DOWN: 503}


def test_a_row_that_ends_inside_a_character_keeps_what_its_tokens_decode_to(gpt2_tokenizer):
    """A multi-byte character is held back while its bytes arrive (no half character in a
    stream); a row that ends before its last bytes flushes what its tokens decode to
    (U+FFFD), as `tokenizer.decode` and the evaluation path give it (found by the property
    test: a batched generating task lost the trailing U+FFFD its row alone kept)."""
    from softprompt.serve.text import RowText, TokenStream

    ids = gpt2_tokenizer("ok 😀", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # the emoji's last byte never comes
    assert gpt2_tokenizer.decode(cut).endswith("\ufffd")
    pieces = []
    row = RowText(gpt2_tokenizer, None, [], TokenStream(lambda text, logprobs: pieces.append(text)))
    for t in cut:
        row.add(t)
    assert not row.text.endswith("\ufffd")  # held back while the character may still complete
    row.flush()
    assert row.text == gpt2_tokenizer.decode(cut) and "".join(pieces) == row.text
