"""Saving and loading: the on-disk format, atomic writes, and every way a load must refuse."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel

import softprompt as sp
from softprompt.io import prompt as spio

from conftest import make_gpt2, make_llama


@pytest.fixture
def saved(gpt2_tokenizer, tmp_path):
    base = make_gpt2(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PTuningConfig(template="[P:2] {text} [P:2] It was [MASK]", encoder="mlp"),
                               tokenizer=gpt2_tokenizer)
    model.save_pretrained(tmp_path / "prompt")
    return model, base, tmp_path / "prompt"


def test_config_records_method_template_and_base_identity(saved):
    model, base, path = saved
    data = json.loads((path / "prompt_config.json").read_text())
    assert data["format"] == "softprompt" and data["format_version"] == 1
    assert data["method"] == "p-tuning" and data["kind"] == "input"
    assert data["template"] == "[P:2] {text} [P:2] It was [MASK]"
    assert data["num_virtual_tokens"] == 4 and data["tensor_shape"] == [4, 32]
    identity = data["base_model"]
    assert identity["model_type"] == "gpt2" and identity["hidden_size"] == 32 and identity["num_layers"] == 2
    assert identity["num_key_value_heads"] == 4 and identity["vocab_size"] == base.config.vocab_size
    assert identity["embedding_fingerprint"] == model.identity.embedding_fingerprint


def test_collapsed_only_save_has_no_trainable_state(gpt2_tokenizer, tmp_path):
    model = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), sp.PrefixTuningConfig(num_virtual_tokens=2), tokenizer=gpt2_tokenizer)
    model.save_pretrained(tmp_path / "p", save_trainable=False)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", "prompt.safetensors", "prompt_config.json"]
    with pytest.raises(sp.PromptFileError, match="trainable.safetensors: missing"):
        sp.SoftPromptModel.from_pretrained(model.base, tmp_path / "p", trainable=True)


def test_resave_replaces_atomically(saved, gpt2_tokenizer):
    model, base, path = saved
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.add_(1.0)
    model.save_pretrained(path)
    loaded = sp.SoftPromptModel.from_pretrained(base, path, tokenizer=gpt2_tokenizer)
    assert torch.equal(loaded.export(), model.export())
    assert [p.name for p in path.parent.iterdir()] == ["prompt"]


def test_failed_save_keeps_previous_prompt_and_leaves_nothing(saved, monkeypatch):
    model, base, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(spio, "save_file", broken)
    with torch.no_grad():
        next(model.prompt.parameters()).add_(1.0)
    with pytest.raises(sp.PromptFileError, match=r"could not be written \(disk full\); what was there before is unchanged"):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["prompt"]


def test_loading_onto_another_base_says_what_differs(saved, gpt2_tokenizer):
    _, _, path = saved
    other = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=48, n_layer=3, n_head=4, n_positions=64))
    with pytest.raises(sp.BaseModelMismatchError) as err:
        sp.SoftPromptModel.from_pretrained(other, path)
    message = str(err.value)
    assert "hidden_size: saved 32, given 48" in message and "num_layers: saved 2, given 3" in message


def test_same_shape_other_weights_is_refused(saved, gpt2_tokenizer):
    _, _, path = saved
    torch.manual_seed(1)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(sp.BaseModelMismatchError, match="embedding_fingerprint"):
        sp.SoftPromptModel.from_pretrained(other, path)


def test_truncated_safetensors_is_named(saved):
    _, base, path = saved
    data = (path / "prompt.safetensors").read_bytes()
    (path / "prompt.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(sp.PromptFileError, match=r"prompt\.safetensors: corrupt or truncated"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_garbage_safetensors_is_named(saved):
    _, base, path = saved
    (path / "prompt.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(sp.PromptFileError, match="corrupt or truncated"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_unknown_format_version(saved):
    _, base, path = saved
    data = json.loads((path / "prompt_config.json").read_text())
    data["format_version"] = 99
    (path / "prompt_config.json").write_text(json.dumps(data))
    with pytest.raises(sp.PromptFileError, match="'format_version' is 99; this softprompt reads version 1"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_invalid_json_names_line_and_column(saved):
    _, base, path = saved
    (path / "prompt_config.json").write_text('{\n  "format": "softprompt",\n  "method" "p-tuning"\n}')
    with pytest.raises(sp.PromptFileError, match=r"prompt_config\.json: invalid JSON at line 3, column 12"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_unknown_config_field_is_named(saved):
    _, base, path = saved
    data = json.loads((path / "prompt_config.json").read_text())
    data["config"]["encodr"] = "lstm"
    (path / "prompt_config.json").write_text(json.dumps(data))
    with pytest.raises(sp.SoftPromptError, match="unknown field.*encodr"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_missing_directory_and_file(tmp_path, gpt2_tokenizer):
    base = make_gpt2(gpt2_tokenizer)
    with pytest.raises(sp.PromptFileError, match="no such prompt directory"):
        sp.SoftPromptModel.from_pretrained(base, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sp.PromptFileError, match=r"prompt_config\.json: missing"):
        sp.SoftPromptModel.from_pretrained(base, tmp_path / "empty")


def test_wrong_tensor_shape_is_refused(saved):
    _, base, path = saved
    data = json.loads((path / "prompt_config.json").read_text())
    data["tensor_shape"] = [5, 32]
    (path / "prompt_config.json").write_text(json.dumps(data))
    with pytest.raises(sp.PromptFileError, match=r"shape \[5, 32\], found \[4, 32\]"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_no_pickle_in_saved_files(saved):
    _, _, path = saved
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x02" and not f.name.endswith((".bin", ".pt", ".pkl"))


def test_deep_prompt_on_model_without_cache_is_refused(wordpiece_tokenizer):
    torch.manual_seed(0)
    base = DistilBertModel(DistilBertConfig(vocab_size=len(wordpiece_tokenizer), dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    with pytest.raises(sp.UnsupportedModelError, match="DistilBertModel takes no cache"):
        sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4), tokenizer=wordpiece_tokenizer)
    # input prompts need only inputs_embeds, which it takes
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=4), tokenizer=wordpiece_tokenizer)
    assert model(**model.encode([{"text": "fine"}])).last_hidden_state.shape[1] == 3  # [CLS] fine [SEP]


def test_llama_gqa_prefix_round_trip(gpt2_tokenizer, tmp_path):
    base = make_llama(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3), tokenizer=gpt2_tokenizer)
    model.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "prompt_config.json").read_text())["tensor_shape"] == [2, 2, 2, 3, 8]


@pytest.mark.parametrize("config", [sp.PromptTuningConfig(num_virtual_tokens=3), sp.PTuningV2Config(num_virtual_tokens=3)])
def test_bfloat16_storage_halves_the_file_and_loads_the_rounded_prompt(gpt2_tokenizer, tmp_path, config):
    base = make_gpt2(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, config, tokenizer=gpt2_tokenizer)
    model.save_pretrained(tmp_path / "fp32", save_trainable=False)
    model.save_pretrained(tmp_path / "bf16", save_trainable=False, dtype="bfloat16")
    fp32, bf16 = ((tmp_path / d / "prompt.safetensors").stat().st_size for d in ("fp32", "bf16"))
    tensor = model.export()
    assert abs((fp32 - bf16) - 2 * tensor.numel()) <= 8  # two bytes fewer per value (header padding aside)
    assert json.loads((tmp_path / "bf16" / "prompt_config.json").read_text())["tensor_dtype"] == "bfloat16"
    loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / "bf16", tokenizer=gpt2_tokenizer)
    assert loaded.export().dtype == torch.float32
    assert torch.equal(loaded.export(), tensor.bfloat16().float())  # exactly the rounded values
    assert not torch.equal(loaded.export(), tensor)  # rounding happened (the test can tell)
    batch = model.encode({"text": "a gem of a film"})
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0.05, atol=0.05)


def test_bad_storage_dtype_is_refused_and_other_dtypes_on_disk_are_named(saved, tmp_path):
    model, base, path = saved
    with pytest.raises(sp.ConfigError, match="dtype must be one of"):
        model.save_pretrained(tmp_path / "x", dtype="float16")
    assert not (tmp_path / "x").exists()
    from safetensors.torch import load_file, save_file

    tensor = load_file(path / "prompt.safetensors")["prompt"]
    save_file({"prompt": tensor.half()}, str(path / "prompt.safetensors"))
    with pytest.raises(sp.PromptFileError, match="prompt.safetensors: tensor 'prompt' is torch.float16"):
        sp.SoftPromptModel.from_pretrained(base, path)


def test_saved_prompt_has_a_model_card(gpt2_tokenizer, tmp_path):
    """README.md beside the prompt: Hugging Face model-card metadata and the prompt's facts."""
    from huggingface_hub import ModelCard

    from softprompt.tasks import Verbalizer
    from softprompt.folder import save_with_task

    base = make_gpt2(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PTuningConfig(template="[P:2] {text} [P:2] It was [MASK]", encoder="lstm"),
                               tokenizer=gpt2_tokenizer)
    task = Verbalizer({"pos": " good", "neg": " bad"})
    task.bind(model)
    save_with_task(model, task, tmp_path / "prompt",
                       {"model": "org/tiny-gpt2", "step": 40, "dev": {"accuracy": 0.875, "macro_f1": 0.87, "n": 16},
                        "train": {"steps": 40, "lr": 0.01, "batch_size": 8}})
    card = ModelCard.load(tmp_path / "prompt" / "README.md")
    assert card.data.library_name == "softprompt" and card.data.base_model == "org/tiny-gpt2"
    assert "p-tuning" in card.data.tags and card.data.metrics == ["accuracy", "macro_f1"]
    text = card.text
    assert "`[P:2] {text} [P:2] It was [MASK]`" in text and "| label words | pos: good; neg: bad |" in text
    assert "accuracy 0.8750" in text and "steps 40, batch_size 8, lr 0.01" in text
    assert "4 virtual tokens" in text
