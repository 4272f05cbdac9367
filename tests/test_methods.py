"""Each method's module: initialisations, architecture as in its paper, dropout, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.methods import CONFIGS, config_class

from conftest import make_gpt2, make_llama


@pytest.fixture
def gpt2(gpt2_tokenizer):
    return make_gpt2(gpt2_tokenizer), gpt2_tokenizer


def table_of(base, tok, **kwargs):
    return sp.SoftPromptModel(base, sp.PromptTuningConfig(**kwargs), tokenizer=tok).export()


def test_vocab_init_rows_are_vocabulary_embeddings(gpt2):
    base, tok = gpt2
    table = table_of(base, tok, num_virtual_tokens=6, init="vocab", init_seed=3)
    weight = base.get_input_embeddings().weight
    for row in table:
        assert (weight == row).all(-1).any()  # every row is some token's embedding
    assert not torch.equal(table, table_of(base, tok, num_virtual_tokens=6, init="vocab", init_seed=4))
    assert torch.equal(table, table_of(base, tok, num_virtual_tokens=6, init="vocab", init_seed=3))


def test_text_init_repeats_the_text_embeddings(gpt2):
    base, tok = gpt2
    ids = tok("Classify the sentiment", add_special_tokens=False)["input_ids"]
    table = table_of(base, tok, num_virtual_tokens=len(ids) * 2 + 1, init="text", init_text="Classify the sentiment")
    weight = base.get_input_embeddings().weight.detach()
    expected = weight[torch.tensor((ids * 3)[: len(ids) * 2 + 1])]
    assert torch.equal(table, expected)
    short = table_of(base, tok, num_virtual_tokens=2, init="text", init_text="Classify the sentiment")
    assert torch.equal(short, weight[torch.tensor(ids[:2])])


def test_labels_init_starts_with_label_words(gpt2):
    base, tok = gpt2
    table = table_of(base, tok, num_virtual_tokens=5, init="labels", label_words=["great", "terrible"])
    ids = [i for w in ("great", "terrible") for i in tok(" " + w, add_special_tokens=False)["input_ids"]]
    weight = base.get_input_embeddings().weight.detach()
    assert torch.equal(table[: len(ids)], weight[torch.tensor(ids)])
    for row in table[len(ids):]:  # the rest sampled from the vocabulary, as in Lester et al.
        assert (weight == row).all(-1).any()


def test_random_init_matches_embedding_scale(gpt2):
    base, tok = gpt2
    table = table_of(base, tok, num_virtual_tokens=200, init="random")
    std = base.get_input_embeddings().weight.std().item()
    assert table.std().item() == pytest.approx(std, rel=0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="text"), "needs init_text"),
    (dict(init="labels"), "needs label_words"),
    (dict(init="zeros"), "init must be one of"),
])
def test_prompt_tuning_config_errors(gpt2, kwargs, match):
    base, tok = gpt2
    with pytest.raises(sp.ConfigError, match=match):
        sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=3, **kwargs), tokenizer=tok)


def test_p_tuning_lstm_is_the_papers_encoder(gpt2):
    base, tok = gpt2
    model = sp.SoftPromptModel(base, sp.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16),
                               tokenizer=tok)
    lstm = model.prompt.lstm
    assert isinstance(lstm, nn.LSTM) and lstm.bidirectional and lstm.num_layers == 2 and lstm.hidden_size == 8
    linears = [m for m in model.prompt.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 16), (16, 32)]
    assert any(isinstance(m, nn.ReLU) for m in model.prompt.mlp)
    # the output is the encoder applied to the trainable input vectors
    x = model.prompt.embedding.unsqueeze(0)
    expected = model.prompt.mlp(lstm(x)[0]).squeeze(0)
    torch.testing.assert_close(model.prompt(), expected)


def test_p_tuning_dropout_acts_in_training_only(gpt2):
    base, tok = gpt2
    model = sp.SoftPromptModel(base, sp.PTuningConfig(num_virtual_tokens=4, encoder="mlp", encoder_dropout=0.5),
                               tokenizer=tok)
    model.train()
    torch.manual_seed(0)
    a = model.prompt()
    b = model.prompt()
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model.prompt(), model.prompt())
    assert torch.equal(model.export(), model.prompt().detach())


@pytest.mark.parametrize("hidden", [7, 0])
def test_p_tuning_config_errors(gpt2, hidden):
    base, tok = gpt2
    with pytest.raises(sp.ConfigError, match="encoder_hidden_size"):
        sp.SoftPromptModel(base, sp.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=hidden), tokenizer=tok)


def test_prefix_projection_and_shapes(gpt2_tokenizer):
    base = make_llama(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PrefixTuningConfig(num_virtual_tokens=5, projection_hidden_size=24),
                               tokenizer=gpt2_tokenizer)
    first, _, last = model.prompt.projection
    assert (first.in_features, first.out_features) == (32, 24)
    assert last.out_features == 2 * 2 * 2 * 8  # L * (K, V) * H_kv * D_head
    assert model.export().shape == (2, 2, 2, 5, 8)
    v2 = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=5), tokenizer=gpt2_tokenizer)
    assert v2.prompt.projection is None  # P-tuning v2: no reparameterisation by default
    assert v2.trainable_parameters() == 5 * 2 * 2 * 2 * 8


def test_prefix_dropout_acts_in_training_only(gpt2):
    base, tok = gpt2
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.5), tokenizer=tok)
    model.train()
    assert (model.prompt() == 0).float().mean() > 0.3
    model.eval()
    assert (model.prompt() == 0).float().mean() == 0


def test_config_registry_and_round_trip():
    assert sorted(CONFIGS) == ["dept", "p-tuning", "p-tuning-v2", "prefix-tuning", "prompt-tuning"]
    config = sp.PTuningConfig(template="[P:2] {text}", encoder="mlp", encoder_dropout=0.1)
    assert config_class("p-tuning").from_dict(config.to_dict()) == config
    dept = sp.DePTConfig(template="[P:2] {text}", rank=4, max_input_length=64, alpha=2.0)
    assert config_class("dept").from_dict(dept.to_dict()) == dept
    with pytest.raises(sp.ConfigError, match="unknown method 'lora'"):
        config_class("lora")


def test_base_is_frozen_by_construction(gpt2):
    base, tok = gpt2
    for p in base.parameters():
        p.requires_grad_(True)
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=2), tokenizer=tok)
    assert not any(p.requires_grad for p in base.parameters())
    assert model.trainable_parameters() == 2 * 32


def test_trainable_parameters_are_printed_as_peft_prints_them(gpt2, capsys):
    """`print_trainable_parameters()`: PEFT's line, with PEFT's own count for the same prompt."""
    from peft import PromptTuningConfig, get_peft_model

    base, tok = gpt2
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=5), tokenizer=tok)
    model.print_trainable_parameters()
    ours = capsys.readouterr().out.strip()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 5 * base.config.n_embd == model.trainable_parameters()
    assert total == trainable + sum(p.numel() for p in base.parameters())
    peft = get_peft_model(make_gpt2(tok), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft.print_trainable_parameters()
    assert ours == capsys.readouterr().out.strip()


def test_residual_prompt_tuning_reparameterises_the_table_and_saves_its_output(gpt2, tmp_path):
    """Residual prompt tuning: p + LayerNorm(W_up ReLU(W_down p)) over the table while
    training (every part gets a gradient); the saved prompt is that output, and the folder
    loads and runs as a plain input prompt with the same logits."""
    base, tok = gpt2
    config = sp.PromptTuningConfig(template="[P:4] {text}", init="vocab", reparameterization="residual",
                                   residual_hidden_size=8)
    model = sp.SoftPromptModel(base, config, tokenizer=tok)
    prompt = model.prompt
    p = prompt.embedding
    r = prompt.residual
    expected = p + torch.nn.functional.layer_norm(r.up(torch.relu(r.down(p))), (p.shape[1],), r.norm.weight, r.norm.bias)
    torch.testing.assert_close(prompt(), expected)
    assert r.norm.weight[0].item() == pytest.approx(base.get_input_embeddings().weight.float().std().item(), rel=1e-5)
    batch = model.encode([{"text": "a fine film"}])
    model(**batch).logits.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [p, r.down.weight, r.up.weight, r.norm.weight])
    model.save_pretrained(tmp_path / "prompt")
    loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / "prompt", tokenizer=tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
        torch.testing.assert_close(loaded.export(), prompt().detach())
    same = sp.SoftPromptModel(base, dataclasses.replace(config), tokenizer=tok).prompt
    torch.testing.assert_close(same(), prompt())  # seeded: the same MLP from the same init_seed


@pytest.mark.parametrize("kwargs,match", [
    ({"reparameterization": "lstm"}, "reparameterization must be one of"),
    ({"reparameterization": "residual", "residual_hidden_size": 0}, "residual_hidden_size must be a positive integer"),
])
def test_residual_config_errors(gpt2, kwargs, match):
    base, tok = gpt2
    with pytest.raises(ConfigError, match=match):
        sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}", **kwargs), tokenizer=tok)


def test_a_prompt_without_the_reparameterisation_is_saved_as_before_it_existed(gpt2, tmp_path):
    """Older softprompt versions refuse config fields they do not know: a plain
    prompt-tuning folder leaves the residual fields out (they are at their defaults), a
    residual one writes them; both load back to the same config."""
    import json

    base, tok = gpt2
    for reparameterization, written in [("none", False), ("residual", True)]:
        config = sp.PromptTuningConfig(template="[P:2] {text}", reparameterization=reparameterization,
                                       residual_hidden_size=8 if written else 400)
        model = sp.SoftPromptModel(base, config, tokenizer=tok)
        model.save_pretrained(tmp_path / reparameterization)
        saved = json.loads((tmp_path / reparameterization / "prompt_config.json").read_text())["config"]
        assert ("reparameterization" in saved) == ("residual_hidden_size" in saved) == written
        loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / reparameterization, tokenizer=tok)
        assert loaded.config.reparameterization == reparameterization
