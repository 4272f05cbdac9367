"""PEFT-style use of a SoftPromptModel (issue 21, item 5).

- ``model(input_ids=..., attention_mask=...)`` with a tokenizer's ids, for the templates whose
  rows are virtual tokens then the text (PEFT's layout): the virtual slots are added, and the
  batch, logits and loss are exactly those of ``model(**model.encode(texts))``, for input and
  deep methods on causal LMs, encoders and an encoder-decoder, padded on either side; and the
  logits and loss are PEFT's own for the same ids (the prompt exported and loaded with PEFT).
- other templates refuse such ids with the reason and what to call instead.
- PEFT's config keywords: each field of PEFT's config classes is either taken (an alias or a
  value softprompt builds too) or refused with where its meaning lives; aliased keywords build
  the parameters PEFT builds from them.
"""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import softprompt as sp
from softprompt.methods import peft_names
from softprompt.peft_format import export_peft

from conftest import make_bert, make_gpt2, make_llama

TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together"]
INPUT = {
    "prompt-tuning": lambda template: sp.PromptTuningConfig(template=template, init="vocab"),
    "p-tuning": lambda template: sp.PTuningConfig(template=template, encoder="lstm", encoder_hidden_size=16),
}
DEEP = {
    "prefix-tuning": lambda template: sp.PrefixTuningConfig(num_virtual_tokens=3, template=template,
                                                            projection_hidden_size=16),
    "p-tuning-v2": lambda template: sp.PTuningV2Config(num_virtual_tokens=3, template=template, init_std=0.5),
}
CASES = ([(m, t) for m in INPUT for t in ("[P:3] {text}", "[P:3] [START] {text}", "[P:2] [P:1] {sentence}")]
         + [(m, t) for m in DEEP for t in ("{text}", "[START] {text}")])
FAMILY_NAMES = ("gpt2", "llama", "bert", "roberta", "t5")


def padded(rows: list[list[int]], side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) ids and attention mask of token lists padded on `side`, as a tokenizer pads them."""
    width = max(map(len, rows))
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad_id] * fill + r if side == "left" else r + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
    return torch.tensor(ids), torch.tensor(mask)


def build(family_models, family: str, method: str, template: str):
    base, tok = family_models(family)
    config = {**INPUT, **DEEP}[method](template)
    return sp.SoftPromptModel(base, config, tokenizer=tok).eval(), base, tok


def targets(model, base, ids, mask):
    """Labels for a loss: the tokens themselves (causal / masked LM, -100 at pads), or a short
    decoder target for an encoder-decoder."""
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        return torch.tensor([[7, 8, 9]]).repeat(ids.shape[0], 1)
    return ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method,template", CASES)
def test_token_ids_give_what_encode_gives(family_models, family, method, template, side):
    model, base, tok = build(family_models, family, method, template)
    if side == "left" and not model.spec.accepts_position_ids:
        with pytest.raises(sp.EncodingError, match="takes no position ids"):
            model.batch_from_ids(*padded([tok(t)["input_ids"] for t in TEXTS], side, model.encoder.pad_id))
        return
    field = model.template.fields[0]
    ids, mask = padded([tok(t)["input_ids"] for t in TEXTS], side, model.encoder.pad_id)
    encoded = model.encode([{field: t} for t in TEXTS], padding_side=side)

    ours = model.batch_from_ids(ids, mask)
    for key in ("input_ids", "attention_mask", "prompt_index"):
        assert torch.equal(ours[key], encoded[key]), key
    P = 0 if model.deep else 3
    assert ours.input_ids.shape == (len(TEXTS), ids.shape[1] + P)

    labels = targets(model, base, ids, mask)
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=mask, labels=labels)
        reference = model(**encoded, labels=labels)
        with model.disable_prompt():
            bare = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert raw.logits.shape[:2] == labels.shape[:2]  # aligned to the ids given (decoder's for T5)
    torch.testing.assert_close(raw.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(raw.loss, reference.loss, rtol=0, atol=0)
    assert torch.equal(raw.attention_mask, mask) or model.spec.kind is sp.ModelKind.SEQ2SEQ
    assert not torch.allclose(raw.logits, bare.logits, atol=1e-4)  # the prompt was applied


@pytest.mark.parametrize("method,template", [("prompt-tuning", "[P:3] {text}"), ("p-tuning", "[P:3] {text}"),
                                             ("prefix-tuning", "{text}")])
def test_generate_from_token_ids(family_models, method, template):
    model, _, tok = build(family_models, "llama", method, template)
    ids, mask = padded([tok(t)["input_ids"] for t in TEXTS], "left", model.encoder.pad_id)
    new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    expected = model.generate(**model.encode([{"text": t} for t in TEXTS]), max_new_tokens=4, do_sample=False)
    assert torch.equal(new, expected)
    with model.disable_prompt():
        assert not torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                               new)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_tokenizers_output_goes_in_whole(family_models, family):
    """``model(**tokenizer(texts, padding=True, return_tensors="pt"))``, as with PEFT (BERT's
    tokenizer adds token_type_ids: all 0 for one text, refused for a pair)."""
    base, tok = family_models(family)
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=3, init="vocab"), tokenizer=tok).eval()
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits,
                                   model(**model.encode([{"text": t} for t in TEXTS], padding_side="right")).logits,
                                   rtol=0, atol=0)
    if "token_type_ids" in inputs:
        with pytest.raises(sp.EncodingError, match="token_type_ids other than 0"):
            model(**tok(TEXTS[0], TEXTS[1], return_tensors="pt"))


def test_start_template_needs_no_tokenizer(wordpiece_tokenizer):
    """``[P:n] [START] {text}`` (PEFT's layout) puts the slots first: known without the
    tokenizer; ``[P:n] {text}`` puts them after [CLS], which only the tokenizer can say."""
    tok = wordpiece_tokenizer
    ids, mask = padded([tok(t)["input_ids"] for t in TEXTS], "right", tok.pad_token_id)
    with_tok = sp.SoftPromptModel(make_bert(tok), INPUT["prompt-tuning"]("[P:3] [START] {text}"), tokenizer=tok).eval()
    without = sp.SoftPromptModel(make_bert(tok), sp.PromptTuningConfig(template="[P:3] [START] {text}"),
                                 prompt=with_tok.prompt).eval()
    with torch.no_grad():
        torch.testing.assert_close(without(input_ids=ids, attention_mask=mask).logits,
                                   with_tok(**with_tok.encode([{"text": t} for t in TEXTS])).logits, rtol=0, atol=0)
    after_cls = sp.SoftPromptModel(make_bert(tok), sp.PromptTuningConfig(num_virtual_tokens=3), prompt=with_tok.prompt)
    with pytest.raises(sp.EncodingError, match=r"without the tokenizer .* pass tokenizer=\.\.\."):
        after_cls(input_ids=ids, attention_mask=mask)


def test_slots_after_the_leading_specials_need_them_in_the_ids(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    model = sp.SoftPromptModel(make_bert(tok), sp.PromptTuningConfig(num_virtual_tokens=3), tokenizer=tok).eval()
    ids, mask = padded([tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS], "right", tok.pad_token_id)
    with pytest.raises(sp.EncodingError, match=r"after the tokenizer's leading special tokens \[101\].*"
                                               r"add_special_tokens=True"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("config,reason", [
    (lambda: sp.PTuningConfig(template="[P:2] {text} [P:1] It was [MASK]"), "an answer slot [MASK]"),
    (lambda: sp.PromptTuningConfig(template="Review: [P:2] {text}"), "anchor text"),
    (lambda: sp.PromptTuningConfig(template="[P:2] {premise} {hypothesis}"), "more than one field"),
    (lambda: sp.PromptTuningConfig(template="{text} [P:3]"), "virtual tokens inside or after the text"),
    (lambda: sp.PTuningConfig(template="[P:1] {text} [P:2]", encoder="mlp"), "virtual tokens inside or after"),
    (lambda: sp.PrefixTuningConfig(num_virtual_tokens=2, template="Question: {text}"), "anchor text"),
])
def test_other_templates_refuse_token_ids(gpt2_tokenizer, config, reason):
    model = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), config(), tokenizer=gpt2_tokenizer)
    ids = torch.tensor([gpt2_tokenizer(TEXTS[0])["input_ids"]])
    for call in (lambda: model(input_ids=ids), lambda: model.generate(input_ids=ids, max_new_tokens=2)):
        with pytest.raises(sp.EncodingError) as info:
            call()
        message = str(info.value)
        assert "without prompt_index" in message and repr(model.template.source) in message
        assert reason in message and "model.encode([{" in message and "model(**batch)" in message


def test_malformed_token_batches_are_refused(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = sp.SoftPromptModel(make_gpt2(tok), sp.PromptTuningConfig(num_virtual_tokens=3), tokenizer=tok).eval()
    ids, mask = padded([tok(t)["input_ids"] for t in TEXTS], "right", tok.pad_token_id)
    with pytest.raises(sp.EncodingError, match="answer_index without prompt_index"):
        model(input_ids=ids, attention_mask=mask, answer_index=torch.zeros(3, dtype=torch.long))
    holes = mask.clone()
    holes[0, 1] = 0
    with pytest.raises(sp.EncodingError, match="one run of tokens per row"):
        model(input_ids=ids, attention_mask=holes)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(sp.EncodingError, match=r"row\(s\) \[1\] of input_ids have no tokens"):
        model(input_ids=ids, attention_mask=empty)
    wide = torch.full((1, 62), 5)  # GPT-2 here has 64 positions; 62 + 3 virtual tokens do not fit
    with pytest.raises(sp.EncodingError, match="max_length=61"):
        model(input_ids=wide)


# -- against PEFT itself ----------------------------------------------------------------------

OURS_FOR_PEFT = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(num_virtual_tokens=3),
    "p-tuning": lambda: sp.PTuningConfig(template="[P:3] {text}", encoder="mlp", encoder_hidden_size=16),
    "prefix-tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=3, projection_hidden_size=16),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=3),
}


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", sorted(OURS_FOR_PEFT))
def test_token_ids_give_peft_logits_and_loss(gpt2_tokenizer, tmp_path, make, method):
    """The same padded ids and labels into our model and into PEFT with the exported prompt:
    the same logits at every token and the same loss (right padding: PEFT's positions count
    pads on the left, see docs/MIGRATING_FROM_PEFT.md)."""
    tok = gpt2_tokenizer
    model = sp.SoftPromptModel(make(tok), OURS_FOR_PEFT[method](), tokenizer=tok).eval()
    export_peft(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(model.base, str(tmp_path / "adapter")).eval()
    ids, mask = padded([tok(t)["input_ids"] for t in TEXTS], "right", tok.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    theirs_logits = theirs.logits[:, -ids.shape[1]:]  # PEFT returns the P virtual positions too
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs_logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)


def test_encoder_token_ids_give_peft_logits(wordpiece_tokenizer, tmp_path):
    tok = wordpiece_tokenizer
    model = sp.SoftPromptModel(make_bert(tok), sp.PromptTuningConfig(template="[P:3] [START] {text}"), tokenizer=tok).eval()
    export_peft(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(model.base, str(tmp_path / "adapter")).eval()
    ids, mask = padded([tok(t)["input_ids"] for t in TEXTS], "right", tok.pad_token_id)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, 3:]
        ours = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=0, atol=1e-5)


# -- PEFT's config names ----------------------------------------------------------------------

PEFT_CLASSES = {
    peft.PromptTuningConfig: [sp.PromptTuningConfig],
    peft.PromptEncoderConfig: [sp.PTuningConfig],
    peft.PrefixTuningConfig: [sp.PrefixTuningConfig, sp.PTuningV2Config],
}


def _peft_config_on(base, peft_class, **kwargs):
    """A PEFT config as PEFT fills it on `base` (token_dim, num_layers, ... set)."""
    return get_peft_model(base, peft_class(task_type="CAUSAL_LM", num_virtual_tokens=3, **kwargs)).peft_config["default"]


@pytest.mark.parametrize("peft_class", list(PEFT_CLASSES), ids=lambda c: c.__name__)
def test_every_peft_field_is_taken_or_refused_with_its_mapping(gpt2_tokenizer, peft_class):
    filled = _peft_config_on(make_gpt2(gpt2_tokenizer), peft_class).to_dict()
    for ours in PEFT_CLASSES[peft_class]:
        for field in dataclasses.fields(peft_class):
            value = filled[field.name]
            try:
                config = ours(**{"num_virtual_tokens": 3, field.name: value})
            except sp.ConfigError as error:  # refused: named, with where its meaning lives
                assert f"PEFT's {field.name}" in str(error) and field.name in peft_names.REFUSED, (field.name, error)
            else:
                taken = (field.name in {f.name for f in dataclasses.fields(ours)}
                         or field.name in peft_names.ALIASES.get(ours.method, {})
                         or field.name in peft_names.BUILT_IN[ours.method] or value is None)
                assert taken and isinstance(config, ours), field.name


def test_peft_configs_as_written_by_users_translate():
    """A PEFT config's own fields (less task_type and PEFT's version) build ours."""
    def ours(cls, peft_config):
        data = {k: v for k, v in peft_config.to_dict().items() if k not in ("task_type", "peft_version")}
        return cls(**data)

    assert ours(sp.PromptTuningConfig, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")) == sp.PromptTuningConfig(
        num_virtual_tokens=4, init="vocab")
    assert ours(sp.PTuningConfig, peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32, encoder_dropout=0.1)) == sp.PTuningConfig(
        num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=32, encoder_dropout=0.1)
    assert ours(sp.PrefixTuningConfig, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=64)
    ) == sp.PrefixTuningConfig(num_virtual_tokens=4, projection=True, projection_hidden_size=64)
    assert ours(sp.PTuningV2Config, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
                ) == sp.PTuningV2Config(num_virtual_tokens=4, projection=False)
    # and through from_dict (YAML configs, --set)
    assert sp.PrefixTuningConfig.from_dict({"num_virtual_tokens": 4, "prefix_projection": False}).projection is False


def test_refusals_say_where_the_meaning_lives():
    with pytest.raises(sp.ConfigError, match="task_type: softprompt reads the kind of model .* off the base model"):
        sp.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with pytest.raises(sp.ConfigError, match=r"tokenizer_name_or_path: the tokenizer is SoftPromptModel's tokenizer="):
        sp.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                              tokenizer_name_or_path="gpt2")
    with pytest.raises(sp.ConfigError, match="peft_type='P_TUNING': the config class is the method"):
        sp.PromptTuningConfig(num_virtual_tokens=3, peft_type="P_TUNING")
    with pytest.raises(sp.ConfigError, match="inference_mode=True: .*from_pretrained"):
        sp.PrefixTuningConfig(num_virtual_tokens=3, inference_mode=True)
    with pytest.raises(sp.ConfigError, match="encoder_num_layers=3: softprompt's LSTM encoder has the paper's 2 layers"):
        sp.PTuningConfig(num_virtual_tokens=3, encoder_num_layers=3)
    with pytest.raises(sp.ConfigError, match="init is given twice"):
        sp.PromptTuningConfig(num_virtual_tokens=3, init="vocab", prompt_tuning_init="TEXT")
    with pytest.raises(sp.ConfigError, match="prefix_projection configures PrefixTuningConfig / PTuningV2Config, not "
                                             "PTuningConfig"):
        sp.PTuningConfig(num_virtual_tokens=3, prefix_projection=True)
    with pytest.raises(sp.ConfigError, match="prompt_tuning_init: 'text' is not one of PEFT's values"):
        sp.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="text")
    with pytest.raises(TypeError):  # neither ours nor PEFT's: Python's own error
        sp.PromptTuningConfig(num_virtual_tokens=3, num_virtual_token=4)


def _shapes(module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in module.parameters() if p.requires_grad)


def test_aliases_build_what_peft_builds(gpt2_tokenizer, tmp_path):
    """The same keywords (PEFT's names) give PEFT's trainable shapes; prompt tuning's text
    init gives PEFT's very table (GPT-2's tokenizer adds no special tokens)."""
    tok = gpt2_tokenizer
    tok.save_pretrained(tmp_path / "tok")
    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="positive or negative")
    theirs = get_peft_model(make_gpt2(tok), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, tokenizer_name_or_path=str(tmp_path / "tok"), **text))
    ours = sp.SoftPromptModel(make_gpt2(tok), sp.PromptTuningConfig(num_virtual_tokens=5, **text), tokenizer=tok)
    torch.testing.assert_close(ours.prompt.embedding, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)

    for kwargs in (dict(prefix_projection=True, encoder_hidden_size=16), dict(prefix_projection=False)):
        theirs = get_peft_model(make_gpt2(tok), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                        **kwargs))
        ours = sp.SoftPromptModel(make_gpt2(tok), sp.PrefixTuningConfig(num_virtual_tokens=3, **kwargs), tokenizer=tok)
        assert _shapes(ours.prompt) == _shapes(theirs.prompt_encoder["default"]), kwargs

    # PEFT's LSTM width is per direction: the refusal's rewrite builds PEFT's encoder
    lstm = dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=8)
    with pytest.raises(sp.ConfigError, match="write encoder='lstm', encoder_hidden_size=16") as refusal:
        sp.PTuningConfig(num_virtual_tokens=3, **lstm)
    assert "per direction" in str(refusal.value)
    theirs = get_peft_model(make_gpt2(tok), peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **lstm))
    ours = sp.SoftPromptModel(make_gpt2(tok), sp.PTuningConfig(num_virtual_tokens=3, encoder="lstm",
                                                               encoder_hidden_size=16), tokenizer=tok)
    assert _shapes(ours.prompt) == _shapes(theirs.prompt_encoder["default"])
    # and export writes it back in PEFT's meaning: PEFT rebuilds that encoder from the adapter
    export_peft(ours, tmp_path / "lstm")
    written = peft.PeftConfig.from_pretrained(str(tmp_path / "lstm"))
    written.inference_mode = False  # PEFT builds the encoder only to train
    again = get_peft_model(make_gpt2(tok), written)
    assert _shapes(again.prompt_encoder["default"]) == _shapes(ours.prompt)
