"""PEFT adapters in and out (peft_format.py), checked against PEFT itself: an imported adapter
gives PEFT's logits, an exported prompt loads with `PeftModel.from_pretrained` and gives ours
(fp32, atol 1e-5), for PEFT's three prompt-learning methods on causal LMs; what PEFT cannot
express is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import softprompt as sp
from softprompt.peft_format import export_peft, import_peft

from conftest import make_gpt2, make_llama

PEFT_CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                         encoder_hidden_size=16),
    "prefix-plain": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}
TEXT = "a gem of a film, and a long one"


def _peft_logits(peft_model, ids):
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_imported_adapter_gives_peft_logits(gpt2_tokenizer, tmp_path, make, kind):
    base = make(gpt2_tokenizer)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, PEFT_CONFIGS[kind]())
    for p in peft_model.prompt_encoder.parameters():  # a trained-looking adapter, not its init
        p.data.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    peft_model.eval()
    ids = torch.tensor([gpt2_tokenizer.encode(TEXT)])
    expected = _peft_logits(peft_model, ids)  # (1, P + S, V) for input prompts, (1, S, V) for prefixes
    base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model.get_base_model()
    model = import_peft(tmp_path / "adapter", base, gpt2_tokenizer).eval()
    batch = model.encode({"text": TEXT})
    with torch.no_grad():
        ours = model(**batch).logits  # (1, S, V): the real tokens
    torch.testing.assert_close(ours, expected[:, -ids.shape[1]:], rtol=0, atol=1e-5)
    # and it saves and reloads as a softprompt prompt folder
    model.save_pretrained(tmp_path / "ours")
    again = sp.SoftPromptModel.from_pretrained(base, tmp_path / "ours", tokenizer=gpt2_tokenizer).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ours, rtol=0, atol=1e-6)


OUR_CONFIGS = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(num_virtual_tokens=3),
    "p-tuning": lambda: sp.PTuningConfig(template="[P:3] {text}", encoder="mlp"),
    "prefix-tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=3, projection_hidden_size=16),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=3),
}


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", sorted(OUR_CONFIGS))
def test_exported_prompt_loads_in_peft_with_our_logits(gpt2_tokenizer, tmp_path, make, method):
    base = make(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, OUR_CONFIGS[method](), tokenizer=gpt2_tokenizer).eval()
    export_peft(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["num_virtual_tokens"] == 3
    batch = model.encode({"text": TEXT})
    with torch.no_grad():
        ours = model(**batch).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([gpt2_tokenizer.encode(TEXT)])
    theirs = _peft_logits(peft_model, ids)[:, -ids.shape[1]:]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, base(input_ids=ids).logits.detach(), atol=1e-3)  # the prompt matters


def test_export_refuses_what_peft_cannot_express(gpt2_tokenizer, wordpiece_tokenizer, tmp_path):
    from conftest import make_bert

    inside = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), sp.PTuningConfig(template="[P:2] {text} [P:2] It was [MASK]"),
                                tokenizer=gpt2_tokenizer)
    with pytest.raises(sp.ConfigError, match="has no PEFT equivalent"):
        export_peft(inside, tmp_path / "a")
    encoder = sp.SoftPromptModel(make_bert(wordpiece_tokenizer), sp.PromptTuningConfig(num_virtual_tokens=2),
                                 tokenizer=wordpiece_tokenizer)
    with pytest.raises(sp.ConfigError, match="PEFT puts input prompts before \\[CLS\\]"):
        export_peft(encoder, tmp_path / "b")
    from conftest import make_t5

    seq2seq = sp.SoftPromptModel(make_t5(wordpiece_tokenizer), sp.PTuningV2Config(num_virtual_tokens=2),
                                 tokenizer=wordpiece_tokenizer)
    with pytest.raises(sp.ConfigError, match="encoder-decoder"):
        export_peft(seq2seq, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_encoder_deep_prompts_convert_both_ways(wordpiece_tokenizer, tmp_path):
    """BERT with a prefix in every layer (PEFT's FEATURE_EXTRACTION prefix tuning = P-tuning v2):
    import gives PEFT's outputs, export loads in PEFT with ours."""
    from conftest import make_bert

    text = "a gem of a film"
    ids = torch.tensor([wordpiece_tokenizer(text)["input_ids"]])
    base = make_bert(wordpiece_tokenizer)
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
    for p in peft_model.prompt_encoder.parameters():
        p.data.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = _peft_logits(peft_model.eval(), ids)
    base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model.get_base_model()
    model = import_peft(tmp_path / "adapter", base, wordpiece_tokenizer).eval()
    with torch.no_grad():
        ours = model(**model.encode({"text": text})).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    mine = sp.SoftPromptModel(make_bert(wordpiece_tokenizer), sp.PTuningV2Config(num_virtual_tokens=3),
                              tokenizer=wordpiece_tokenizer).eval()
    export_peft(mine, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    theirs = _peft_logits(PeftModel.from_pretrained(mine.base, str(tmp_path / "out")).eval(), ids)
    with torch.no_grad():
        torch.testing.assert_close(theirs, mine(**mine.encode({"text": text})).logits, rtol=0, atol=1e-5)


def test_import_refuses_adapters_with_head_weights(wordpiece_tokenizer, tmp_path):
    from peft import PeftModel  # noqa: F401 - the same package writes the adapter
    from transformers import BertConfig, BertForSequenceClassification

    classifier = BertForSequenceClassification(BertConfig(vocab_size=wordpiece_tokenizer.vocab_size, hidden_size=32,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, max_position_embeddings=64))
    adapter = get_peft_model(classifier, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    adapter.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(sp.PromptFileError, match="task_type' is 'SEQ_CLS'|holds more than the prompt"):
        import_peft(tmp_path / "adapter", classifier)


def test_import_refuses_bad_adapters(gpt2_tokenizer, tmp_path):
    from peft import LoraConfig

    base = make_gpt2(gpt2_tokenizer)
    lora = get_peft_model(make_gpt2(gpt2_tokenizer), LoraConfig(target_modules=["c_attn"], r=2))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(sp.PromptFileError, match="'peft_type' is 'LORA'"):
        import_peft(tmp_path / "lora", base)
    prompt = get_peft_model(make_gpt2(gpt2_tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prompt.save_pretrained(str(tmp_path / "prompt"))
    from transformers import GPT2Config, GPT2LMHeadModel

    wide = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=48, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(sp.BaseModelMismatchError, match="token_dim: adapter 32, base 48"):
        import_peft(tmp_path / "prompt", wide)
    config = tmp_path / "prompt" / "adapter_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "num_virtual_tokens": "three"}))
    with pytest.raises(sp.PromptFileError, match="adapter_config.json: field 'num_virtual_tokens' must be a positive"):
        import_peft(tmp_path / "prompt", base)
    config.write_text('{"peft_type": "PROMPT_TUNING",\n "num_virtual_tokens": 3,,}')
    with pytest.raises(sp.PromptFileError, match="invalid JSON at line 2"):
        import_peft(tmp_path / "prompt", base)


def test_cli_import_then_export_round_trip(gpt2_tokenizer, tmp_path):
    """`softprompt import --from peft` then `softprompt export --to peft`: the adapter comes back
    with the same tensor, and a bad format name is refused."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from softprompt.cli import app

    base = make_gpt2(gpt2_tokenizer)
    base.save_pretrained(tmp_path / "gpt2")
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    adapter = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for p in adapter.prompt_encoder.parameters():
        p.data.normal_(0, 0.5)
    adapter.save_pretrained(str(tmp_path / "adapter"))
    runner = CliRunner()
    done = runner.invoke(app, ["import", str(tmp_path / "adapter"), str(tmp_path / "prompt"), "--from", "peft",
                               "--model", str(tmp_path / "gpt2")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "prompt" / "prompt_config.json").read_text())["method"] == "prefix-tuning"
    done = runner.invoke(app, ["export", str(tmp_path / "prompt"), str(tmp_path / "back"), "--to", "peft"])
    assert done.exit_code == 0, done.output
    before, after = (load_file(tmp_path / d / "adapter_model.safetensors")["prompt_embeddings"] for d in ("adapter", "back"))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    done = runner.invoke(app, ["export", str(tmp_path / "prompt"), str(tmp_path / "x"), "--to", "lora"])
    assert done.exit_code == 1 and "--to 'lora': known formats: peft" in done.output
