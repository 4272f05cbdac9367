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
    (dict(init="glorot"), "init must be one of ('random', 'zeros', 'text', 'prompt')"),
    (dict(init="prompt"), "init='prompt' needs init_prompt"),
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


def test_a_prompt_starts_from_another_trained_prompt_of_the_base(gpt2_tokenizer, tmp_path):
    """Prompt transfer: ``init="prompt"`` takes another prompt folder's tensor, as saved for
    the same length, resampled (ends kept) for another; input from input, deep from deep."""
    base = make_gpt2(gpt2_tokenizer)
    source = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:4] {text}", init="vocab"),
                                tokenizer=gpt2_tokenizer)
    source.save_pretrained(tmp_path / "input")
    same = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:4] {text}", init="prompt",
                                                          init_prompt=str(tmp_path / "input")), tokenizer=gpt2_tokenizer)
    assert torch.equal(same.prompt(), source.prompt().detach())
    longer = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:7] {text}", init="prompt",
                                                            init_prompt=str(tmp_path / "input")), tokenizer=gpt2_tokenizer)
    table = longer.prompt().detach()
    assert table.shape[0] == 7
    assert torch.allclose(table[0], source.prompt()[0]) and torch.allclose(table[-1], source.prompt()[-1])
    assert torch.allclose(table[2], source.prompt()[1])  # 7 points over 4: every other one a saved row ...
    assert torch.allclose(table[3], (source.prompt()[1] + source.prompt()[2]) / 2)  # ... the others midpoints

    deep = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3), tokenizer=gpt2_tokenizer)
    deep.save_pretrained(tmp_path / "deep")
    again = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, init="prompt",
                                                        init_prompt=str(tmp_path / "deep")), tokenizer=gpt2_tokenizer)
    assert torch.allclose(again.prompt(), deep.prompt().detach())
    with pytest.raises(ConfigError, match="is a input prompt .prompt-tuning.; a deep prompt starts only from"):
        sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, init="prompt",
                                                    init_prompt=str(tmp_path / "input")), tokenizer=gpt2_tokenizer)


def test_a_prompt_of_another_base_is_refused(gpt2_tokenizer, tmp_path):
    from softprompt.errors import BaseModelMismatchError
    from test_serve_isolation import llama

    sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), sp.PromptTuningConfig(template="[P:4] {text}"),
                       tokenizer=gpt2_tokenizer).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BaseModelMismatchError, match="was saved for another base model"):
        sp.SoftPromptModel(llama(gpt2_tokenizer), sp.PromptTuningConfig(template="[P:4] {text}", init="prompt",
                                                                        init_prompt=str(tmp_path / "gpt2")),
                           tokenizer=gpt2_tokenizer)
