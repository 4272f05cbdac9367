"""How a deep prefix starts (`PrefixTuningConfig.init`): ``text`` puts the base's own keys
and values of a text in every layer, so the untrained prompt reads a row exactly as the
base reads the text followed by the row (a prefix sits at positions 0..P-1); ``zeros``
starts every key and value at 0, with or without the projection; bad settings refused."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError

from conftest import make_gpt2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_text_prefix_reads_a_row_as_the_base_reads_the_text_before_it(gpt2_tokenizer, family):
    from test_serve_isolation import llama

    base = make_gpt2(gpt2_tokenizer) if family == "gpt2" else llama(gpt2_tokenizer)
    text = " the film was long and slow"
    P = len(gpt2_tokenizer(text, add_special_tokens=False)["input_ids"])
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=P, template="{text}", init="text",
                                                        init_text=text), tokenizer=gpt2_tokenizer).eval()
    row = " but the ending was good"
    with torch.no_grad():
        out = model(**model.encode([{"text": row}]))
        whole = base(**gpt2_tokenizer(text + row, return_tensors="pt"))
    n = len(gpt2_tokenizer(row, add_special_tokens=False)["input_ids"])
    assert torch.allclose(out.logits[0, -n:], whole.logits[0, -n:], atol=1e-4)


def test_a_short_text_is_repeated_to_the_prefix_length(gpt2_tokenizer):
    base = make_gpt2(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=5, init="text", init_text=" hi there"),
                               tokenizer=gpt2_tokenizer)
    prefix = model.prompt()  # (L, 2, H, P, Dh)
    ids = gpt2_tokenizer(" hi there", add_special_tokens=False)["input_ids"]
    assert prefix.shape[3] == 5
    with torch.no_grad():
        again = base(input_ids=torch.tensor([(ids * 3)[:5]]), use_cache=True).past_key_values
    assert torch.allclose(prefix[0, 0], again.layers[0].keys[0], atol=1e-6)


@pytest.mark.parametrize("projection", [False, True])
def test_zeros_start_every_key_and_value_at_zero(gpt2_tokenizer, projection):
    base = make_gpt2(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PrefixTuningConfig(num_virtual_tokens=4, projection=projection, init="zeros"),
                               tokenizer=gpt2_tokenizer)
    assert model.prompt().abs().max().item() == 0.0
    assert any(p.requires_grad for p in model.prompt.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(init="text"), "init='text' needs init_text"),
    (dict(init="text", init_text="x", projection=True), "needs projection=false"),
    (dict(init="glorot"), "init must be one of ('random', 'zeros', 'text')"),
])
def test_bad_init_settings_are_refused(kwargs, message):
    config = sp.PrefixTuningConfig(num_virtual_tokens=4, **kwargs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate()


def test_text_init_on_an_encoder_is_refused_by_name(wordpiece_tokenizer):
    from conftest import make_bert

    with pytest.raises(ConfigError, match="init='text' takes the keys and values of a causal LM"):
        sp.SoftPromptModel(make_bert(wordpiece_tokenizer).bert, sp.PTuningV2Config(num_virtual_tokens=4, init="text",
                                                                                   init_text="hello"),
                           tokenizer=wordpiece_tokenizer)
