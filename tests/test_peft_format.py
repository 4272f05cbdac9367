"""PEFT adapters in and out (peft_format.py), checked against PEFT itself: an imported adapter
gives PEFT's logits, an exported prompt loads with `PeftModel.from_pretrained` and gives ours
(fp32, atol 1e-5), for PEFT's three prompt-learning methods on causal LMs, deep prompts and
input prompts on encoders, input prompts on encoder-decoders (T5, BART); what PEFT cannot
express is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import softprompt as sp
from softprompt import inject
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
    # residual prompt tuning exports the MLP's output: PEFT's prompt tuning with that table
    "residual-prompt-tuning": lambda: sp.PromptTuningConfig(num_virtual_tokens=3, reparameterization="residual",
                                                            residual_hidden_size=8),
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
    with pytest.raises(sp.ConfigError, match=r"after the tokenizer's leading special tokens \['\[CLS\]'\], PEFT before"):
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


# -- input prompts before the leading special tokens: encoders and encoder-decoders ---------

SEQ2SEQ_PEFT = {  # PEFT's defaults for SEQ_2_SEQ_LM: num_transformer_submodules 2 (2P rows saved)
    "prompt": lambda: PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
    "p-tuning-mlp": lambda: PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=16),
    "p-tuning-lstm": lambda: PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=16,
                                                 encoder_reparameterization_type="LSTM"),
}
DECODER_IDS = [[0, 7, 11, 13, 2]]  # any decoder input: the same for PEFT and for us


def _seq2seq(family, wordpiece_tokenizer, bart_tokenizer):
    from conftest import make_bart, make_t5

    return (make_t5(wordpiece_tokenizer), wordpiece_tokenizer) if family == "t5" else \
        (make_bart(bart_tokenizer), bart_tokenizer)


def _perturbed_peft(base, config, directory):
    torch.manual_seed(1)
    peft_model = get_peft_model(base, config)
    for p in peft_model.prompt_encoder.parameters():  # a trained-looking adapter, not its init
        p.data.normal_(0, 0.5)
    peft_model.save_pretrained(str(directory))
    return peft_model.eval()


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("kind", sorted(SEQ2SEQ_PEFT))
def test_imported_seq2seq_input_adapter_gives_peft_logits(wordpiece_tokenizer, bart_tokenizer, tmp_path, family, kind):
    """T5 / BART with PEFT's prompt tuning or P-tuning (SEQ_2_SEQ_LM, 2 submodules): the first P
    saved rows in front of the encoder input, before [CLS] / <s>; decoder logits, loss and
    greedy generation equal PEFT's."""
    base, tok = _seq2seq(family, wordpiece_tokenizer, bart_tokenizer)
    trained = _perturbed_peft(base, SEQ2SEQ_PEFT[kind](), tmp_path / "adapter")
    base = trained.unload() if hasattr(trained, "unload") else trained.get_base_model()
    # What PEFT gives with the adapter: the saved tensor, as `from_pretrained` loads it (the
    # live training-time LSTM differs from its own saved output by float noise under no_grad).
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    dec, labels = torch.tensor(DECODER_IDS), torch.tensor([[7, 11, 13, 2, 5]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        expected_loss = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    expected_tokens = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                          do_sample=False)[:, 1:]  # without the decoder start token
    model = import_peft(tmp_path / "adapter", base, tok).eval()
    assert model.template.source == "[P:3] [START] {text}"
    batch = model.encode({"text": TEXT})
    with torch.no_grad():
        ours = model(**batch, decoder_input_ids=dec).logits
        loss = model(**batch, labels=labels).loss
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert model.generate(**batch, max_new_tokens=5, do_sample=False).tolist() == expected_tokens.tolist()
    with torch.no_grad():  # the prompt matters, and so does its place before the leading special token
        assert not torch.allclose(ours, base(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-3)
        after = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=3), tokenizer=tok,
                                   prompt=model.prompt).eval()
        assert not torch.allclose(after(**after.encode({"text": TEXT}), decoder_input_ids=dec).logits, ours, atol=1e-3)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_exported_seq2seq_input_prompt_loads_in_peft_with_our_logits(wordpiece_tokenizer, bart_tokenizer, tmp_path,
                                                                     family, method):
    """Ours -> PEFT gives our logits and generation; ours -> PEFT -> ours gives the same tensor."""
    base, tok = _seq2seq(family, wordpiece_tokenizer, bart_tokenizer)
    template = "[P:3] [START] {text}"
    config = sp.PromptTuningConfig(template=template) if method == "prompt-tuning" else \
        sp.PTuningConfig(template=template, encoder="mlp")
    model = sp.SoftPromptModel(base, config, tokenizer=tok).eval()
    export_peft(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["task_type"], written["num_transformer_submodules"]) == ("SEQ_2_SEQ_LM", 1)
    batch, dec = model.encode({"text": TEXT}), torch.tensor(DECODER_IDS)
    with torch.no_grad():
        ours = model(**batch, decoder_input_ids=dec).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    theirs_tokens = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                        do_sample=False)[:, 1:]
    assert model.generate(**batch, max_new_tokens=5, do_sample=False).tolist() == theirs_tokens.tolist()
    with torch.no_grad():
        assert not torch.allclose(ours, base(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-3)
    back = import_peft(tmp_path / "adapter", peft_model.get_base_model(), tok)
    torch.testing.assert_close(back.export(), model.export(), rtol=0, atol=0)
    assert back.template.source == template


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_input_prompts_convert_both_ways(wordpiece_tokenizer, roberta_tokenizer, tmp_path, family):
    """BERT / RoBERTa with PEFT's FEATURE_EXTRACTION prompt tuning (prompts before [CLS] / <s>):
    import gives PEFT's outputs, export loads in PEFT with ours."""
    from conftest import make_bert, make_roberta

    make, tok = (make_bert, wordpiece_tokenizer) if family == "bert" else (make_roberta, roberta_tokenizer)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    peft_model = _perturbed_peft(make(tok), PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3),
                                 tmp_path / "adapter")
    expected = _peft_logits(peft_model, ids)[:, 3:]  # (1, S, V): PEFT's outputs of the real tokens
    base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model.get_base_model()
    model = import_peft(tmp_path / "adapter", base, tok).eval()
    with torch.no_grad():
        ours = model(**model.encode({"text": TEXT})).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, base(input_ids=ids).logits.detach(), atol=1e-3)
    mine = sp.SoftPromptModel(make(tok), sp.PTuningConfig(template="[P:3] [START] {text}"), tokenizer=tok).eval()
    export_peft(mine, tmp_path / "out")
    theirs = _peft_logits(PeftModel.from_pretrained(mine.base, str(tmp_path / "out")).eval(), ids)[:, 3:]
    with torch.no_grad():
        torch.testing.assert_close(theirs, mine(**mine.encode({"text": TEXT})).logits, rtol=0, atol=1e-5)
    back = import_peft(tmp_path / "out", mine.base, tok)  # ours -> PEFT -> ours: the same tensor and layout
    torch.testing.assert_close(back.export(), mine.export(), rtol=0, atol=0)
    assert back.template.source == "[P:3] [START] {text}"


# -- what has no equivalent ----------------------------------------------------------------


@pytest.mark.parametrize("submodules, reason", [
    (2, "num_transformer_submodules 2 .* self-attention layer j the adapter's layer slot 2j mod num_layers"),
    (1, "num_transformer_submodules 1 .* cross-attention layers also append the encoder's keys"),
])
def test_import_refuses_seq2seq_prefix_tuning(wordpiece_tokenizer, tmp_path, submodules, reason):
    from conftest import make_t5

    base = make_t5(wordpiece_tokenizer)
    _perturbed_peft(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3,
                                             num_transformer_submodules=submodules), tmp_path / "adapter")
    with pytest.raises(sp.PromptFileError, match=reason):
        import_peft(tmp_path / "adapter", make_t5(wordpiece_tokenizer), wordpiece_tokenizer)


def test_peft_seq2seq_prefix_is_what_the_refusal_says(wordpiece_tokenizer, tmp_path):
    """The refusal's claim, checked on PEFT itself: with 2 submodules its prefix reaches only
    the decoder's self-attention, layer j reading slot 2j mod L (here L = 2: both read slot 0)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from conftest import make_t5

    peft_model = _perturbed_peft(make_t5(wordpiece_tokenizer),
                                 PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3), tmp_path / "a")
    ids, dec = torch.tensor([wordpiece_tokenizer(TEXT)["input_ids"]]), torch.tensor(DECODER_IDS)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
    table = peft_model.prompt_encoder["default"].embedding.weight.detach()  # (P, L * 2 * H * D_head)
    kv = table.view(3, 2, 2, 4, 8).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D_head)
    base = peft_model.get_base_model()

    def decoder_only(slot):
        cache = DynamicCache()
        for j in range(2):
            cache.update(kv[slot(j), 0][None], kv[slot(j), 1][None], j)
        with torch.no_grad():
            return base(input_ids=ids, decoder_input_ids=dec, use_cache=True,
                        **{inject.CACHE_ARG: EncoderDecoderCache(cache, DynamicCache())}).logits

    torch.testing.assert_close(decoder_only(lambda j: 2 * j % 2), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(decoder_only(lambda j: j), expected, atol=1e-3)  # not layer j's own slot


def test_export_and_import_refuse_mismatched_layouts(gpt2_tokenizer, wordpiece_tokenizer, tmp_path):
    from conftest import make_bert, make_t5

    t5 = make_t5(wordpiece_tokenizer)
    deep = sp.SoftPromptModel(t5, sp.PrefixTuningConfig(num_virtual_tokens=2), tokenizer=wordpiece_tokenizer)
    with pytest.raises(sp.ConfigError, match="encoder-decoder .* slot 2j mod num_layers"):
        export_peft(deep, tmp_path / "a")
    after_cls = sp.SoftPromptModel(t5, sp.PromptTuningConfig(num_virtual_tokens=2), tokenizer=wordpiece_tokenizer)
    with pytest.raises(sp.ConfigError, match=r"leading special tokens \['\[CLS\]'\], PEFT before them "
                                             r"\(the template '\[P:2\] \[START\] \{text\}'\)"):
        export_peft(after_cls, tmp_path / "b")
    unknown = sp.SoftPromptModel(make_bert(wordpiece_tokenizer), sp.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(sp.ConfigError, match="without the tokenizer"):
        export_peft(unknown, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")
    # a SEQ_2_SEQ_LM adapter on a causal LM, a causal one on T5
    get_peft_model(make_t5(wordpiece_tokenizer), SEQ2SEQ_PEFT["prompt"]()).save_pretrained(str(tmp_path / "s2s"))
    with pytest.raises(sp.PromptFileError, match="'task_type' is 'SEQ_2_SEQ_LM' but the base model \\(gpt2\\) is not"):
        import_peft(tmp_path / "s2s", make_gpt2(gpt2_tokenizer))
    get_peft_model(make_gpt2(gpt2_tokenizer), PEFT_CONFIGS["prompt"]()).save_pretrained(str(tmp_path / "causal"))
    with pytest.raises(sp.PromptFileError, match="'task_type' is 'CAUSAL_LM' but the base model \\(t5\\) is an"):
        import_peft(tmp_path / "causal", t5)
