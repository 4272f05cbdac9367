"""The encoder: templates rendered through real tokenizers for tiny models.

Every layout is checked against ids computed independently from the tokenizer, so a slot
in the wrong place, a missing special token or a truncated anchor cannot pass.
"""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softprompt as sp
from softprompt.encode import EncodedRow, TemplateEncoder
from softprompt.errors import ConfigError, EncodingError, TemplateError
from softprompt.template import parse_template

from conftest import make_bert, make_gpt2, make_t5

FILM = "a gem of a film"
LONG = " ".join(["word"] * 150)  # 150 GPT-2 / WordPiece tokens, far over the 64 positions


@pytest.fixture(scope="module")
def gpt2_spec(gpt2_tokenizer):
    return sp.model_spec(make_gpt2(gpt2_tokenizer))


@pytest.fixture(scope="module")
def bert_spec(wordpiece_tokenizer):
    return sp.model_spec(make_bert(wordpiece_tokenizer))


@pytest.fixture(scope="module")
def t5_spec(wordpiece_tokenizer):
    return sp.model_spec(make_t5(wordpiece_tokenizer))


@pytest.fixture(scope="module")
def gpt2_enc(gpt2_tokenizer, gpt2_spec):
    def make(template: str, deep_tokens: int = 0) -> TemplateEncoder:
        return TemplateEncoder(parse_template(template), gpt2_tokenizer, gpt2_spec, deep_tokens)

    return make


@pytest.fixture(scope="module")
def bert_enc(wordpiece_tokenizer, bert_spec):
    def make(template: str, deep_tokens: int = 0) -> TemplateEncoder:
        return TemplateEncoder(parse_template(template), wordpiece_tokenizer, bert_spec, deep_tokens)

    return make


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def real_ids(row: EncodedRow, tok) -> list[int]:
    """The row's tokens that are neither virtual slots nor special tokens."""
    special = set(tok.all_special_ids)
    return [t for t, p in zip(row.input_ids, row.prompt_index) if p < 0 and t not in special]


def squash(text: str) -> str:
    return " ".join(text.split())


def check_lengths(row: EncodedRow) -> None:
    n = len(row.input_ids)
    assert len(row.prompt_index) == len(row.field_index) == len(row.word_index) == n


def field_tokens(row: EncodedRow, field_no: int) -> list[int]:
    return [t for t, f in zip(row.input_ids, row.field_index) if f == field_no]


# -- layout: virtual slots, specials, answer position -------------------------------


def test_gpt2_layout(gpt2_tokenizer, gpt2_enc):
    tok = gpt2_tokenizer
    enc = gpt2_enc("[P:3] {text} [P:3] It was [MASK] .")
    row = enc.encode({"text": FILM})
    check_lengths(row)
    text_ids = ids(tok, FILM)  # first real item: no leading space
    anchor_ids = ids(tok, " It was")  # a word boundary before the anchor
    pad = tok.pad_token_id
    # Nothing after the answer slot, no EOS: the causal LM reads / continues at the end.
    assert row.input_ids == [pad] * 3 + text_ids + [pad] * 3 + anchor_ids
    n = len(text_ids)
    assert row.prompt_index == [0, 1, 2] + [-1] * n + [3, 4, 5] + [-1] * len(anchor_ids)
    assert row.field_index == [-1] * 3 + [0] * n + [-1] * (3 + len(anchor_ids))
    assert row.word_index == [-1] * len(row.input_ids)
    # The answer is read at the last token before [MASK] (" was").
    assert row.answer_index == len(row.input_ids) - 1
    assert row.input_ids[row.answer_index] == ids(tok, " was")[0]
    assert tok.eos_token_id not in real_ids(row, tok)


def test_gpt2_entailment_layout(gpt2_tokenizer, gpt2_enc):
    tok = gpt2_tokenizer
    enc = gpt2_enc("{premise} [P:2] Question: {hypothesis} ? [P:2] Answer: [MASK]")
    row = enc.encode({"premise": "It rained.", "hypothesis": "The street is wet"})
    check_lengths(row)
    pieces = [ids(tok, "It rained."), None, ids(tok, " Question:"), ids(tok, " The street is wet"),
              ids(tok, " ?"), None, ids(tok, " Answer:")]
    expected_ids, expected_prompt, expected_field = [], [], []
    slots = iter([[0, 1], [2, 3]])
    field_of = {0: 0, 3: 1}
    for k, piece in enumerate(pieces):
        if piece is None:
            s = next(slots)
            expected_ids += [tok.pad_token_id] * 2
            expected_prompt += s
            expected_field += [-1, -1]
        else:
            expected_ids += piece
            expected_prompt += [-1] * len(piece)
            expected_field += [field_of.get(k, -1)] * len(piece)
    assert row.input_ids == expected_ids
    assert row.prompt_index == expected_prompt
    assert row.field_index == expected_field
    assert row.answer_index == len(expected_ids) - 1
    assert tok.decode(real_ids(row, tok)) == "It rained. Question: The street is wet ? Answer:"


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_wordpiece_layout_masked(family, wordpiece_tokenizer, bert_spec, t5_spec):
    tok = wordpiece_tokenizer
    spec = bert_spec if family == "bert" else t5_spec
    enc = TemplateEncoder(parse_template("[P:3] {text} [P:3] It was [MASK] ."), tok, spec)
    row = enc.encode({"text": FILM})
    check_lengths(row)
    text_ids, anchor_ids, dot = ids(tok, FILM), ids(tok, "It was"), ids(tok, ".")
    expected = ([tok.cls_token_id] + [tok.pad_token_id] * 3 + text_ids + [tok.pad_token_id] * 3 + anchor_ids
                + [tok.mask_token_id] + dot + [tok.sep_token_id])
    assert row.input_ids == expected
    assert row.input_ids[0] == tok.cls_token_id and row.input_ids[-1] == tok.sep_token_id
    n = len(text_ids)
    assert row.prompt_index == [-1, 0, 1, 2] + [-1] * n + [3, 4, 5] + [-1] * (len(anchor_ids) + 1 + len(dot) + 1)
    assert row.answer_index == 4 + n + 3 + len(anchor_ids)
    assert row.input_ids[row.answer_index] == tok.mask_token_id
    assert row.input_ids.count(tok.mask_token_id) == 1
    assert row.field_index.count(0) == n and row.field_index[4 : 4 + n] == [0] * n


def test_start_puts_virtual_tokens_before_the_leading_specials(wordpiece_tokenizer, bert_spec, gpt2_tokenizer, gpt2_enc):
    """``[P:3] [START] {text}``: the virtual slots before [CLS] (PEFT's layout), the same
    text tokens as ``[P:3] {text}``; a tokenizer without leading specials encodes both alike."""
    tok = wordpiece_tokenizer
    before = TemplateEncoder(parse_template("[P:3] [START] {text} [MASK]"), tok, bert_spec).encode({"text": FILM})
    after = TemplateEncoder(parse_template("[P:3] {text} [MASK]"), tok, bert_spec).encode({"text": FILM})
    check_lengths(before)
    n = len(ids(tok, FILM))
    assert before.input_ids == [tok.pad_token_id] * 3 + [tok.cls_token_id] + after.input_ids[4:]
    assert before.prompt_index == [0, 1, 2] + [-1] * (n + 3)
    assert before.field_index == [-1] * 4 + [0] * n + [-1, -1]
    assert before.answer_index == after.answer_index == 4 + n
    with_start, plain = (gpt2_enc(t).encode({"text": FILM}) for t in ("[P:3] [START] {text}", "[P:3] {text}"))
    assert with_start == plain


def test_t5_has_no_position_limit(wordpiece_tokenizer, t5_spec):
    enc = TemplateEncoder(parse_template("[P:4] {text} [MASK]"), wordpiece_tokenizer, t5_spec)
    assert enc.max_length is None
    row = enc.encode({"text": LONG})
    assert len(row.input_ids) == 1 + 4 + 150 + 1 + 1  # nothing truncated
    row = enc.encode({"text": LONG}, max_length=20)
    assert len(row.input_ids) == 20
    assert row.prompt_index[1:5] == [0, 1, 2, 3]
    assert row.input_ids[-2:] == [wordpiece_tokenizer.mask_token_id, wordpiece_tokenizer.sep_token_id]


def test_decoded_real_tokens_give_back_the_text_bpe(gpt2_tokenizer, gpt2_enc):
    tok = gpt2_tokenizer
    enc = gpt2_enc("[P:2] Review: {text} [P:1] Overall, it was [MASK] .")
    text = "  An  odd, lovely film -- 10/10!  "
    row = enc.encode({"text": text})
    decoded = tok.decode(real_ids(row, tok), clean_up_tokenization_spaces=False)
    assert squash(decoded) == squash("Review: " + text + " Overall, it was")
    # The field's own tokens decode to the text itself, byte for byte (after the boundary space).
    assert tok.decode(field_tokens(row, 0)) == " " + text


def test_decoded_real_tokens_give_back_the_text_wordpiece(wordpiece_tokenizer, bert_enc):
    tok = wordpiece_tokenizer
    enc = bert_enc("{premise} [P:2] Question: {hypothesis} ? [P:2] Answer: [MASK]")
    ex = {"premise": "The Cat sat on the MAT, unbelievably.", "hypothesis": "A cat sat"}
    row = enc.encode(ex)
    decoded = tok.decode(real_ids(row, tok))
    expected = f"{ex['premise']} Question: {ex['hypothesis']} ? Answer:".lower()
    assert "".join(decoded.split()) == "".join(expected.split())


# -- field values ------------------------------------------------------------------


def test_missing_field_names_field_and_example(gpt2_enc, bert_enc):
    for enc in (gpt2_enc("{premise} [P:2] {hypothesis} [MASK]"), bert_enc("{premise} [P:2] {hypothesis} [MASK]")):
        with pytest.raises(EncodingError, match=r"example 3 .*'hypothesis'") as info:
            enc.encode({"premise": "x", "hypo": "y"}, index=3)
        assert "hypo" in str(info.value)  # lists the fields the example has


def test_missing_field_through_model_encode(gpt2_tokenizer):
    model = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), sp.PromptTuningConfig(template="[P:2] {text}"),
                               tokenizer=gpt2_tokenizer)
    with pytest.raises(EncodingError, match=r"example 2 .*'text'"):
        model.encode([{"text": "a"}, {"text": "b"}, {"txt": "c"}])


@pytest.mark.parametrize("value", [3, None, 2.5, {"a": "b"}, [1, 2], ["ok", 3], b"bytes", object()])
def test_non_string_field_value(gpt2_enc, value):
    with pytest.raises(EncodingError, match=r"example 1: field 'text' must be a string or a list of words"):
        gpt2_enc("[P:2] {text}").encode({"text": value}, index=1)


def test_example_must_be_a_mapping(gpt2_enc):
    with pytest.raises(EncodingError, match="mapping"):
        gpt2_enc("[P:2] {text}").encode("just a string")


def test_word_lists_wordpiece(wordpiece_tokenizer, bert_enc):
    tok = wordpiece_tokenizer
    words = ["Hello", "unbelievably", "tokenization", "!"]
    row = bert_enc("[P:2] Tokens: {tokens}").encode({"tokens": words})
    check_lengths(row)
    positions = [i for i, w in enumerate(row.word_index) if w >= 0]
    assert [row.word_index[i] for i in positions] == [0, 1, 1, 1, 1, 1, 2, 2, 3]
    assert all(row.field_index[i] == 0 for i in positions)
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # contiguous
    for k, word in enumerate(words):
        span = [t for t, w in zip(row.input_ids, row.word_index) if w == k]
        assert span == ids(tok, word)
        first, *later = tok.convert_ids_to_tokens(span)
        assert not first.startswith("##") and all(p.startswith("##") for p in later)


def test_word_lists_bpe(gpt2_tokenizer, gpt2_enc):
    tok = gpt2_tokenizer
    words = ["Hello", "unbelievably", "tokenization", "!"]
    for template, first_space in (("[P:2] {tokens} [P:1]", False), ("Tokens: {tokens} [P:2]", True)):
        row = gpt2_enc(template).encode({"tokens": words})
        word_nos = [w for w in row.word_index if w >= 0]
        assert sorted(set(word_nos)) == [0, 1, 2, 3] and word_nos == sorted(word_nos)
        for k, word in enumerate(words):
            span = [t for t, w in zip(row.input_ids, row.word_index) if w == k]
            lead = " " if (k > 0 or first_space) else ""
            assert span == ids(tok, lead + word)
            assert tok.decode(span) == lead + word


def test_field_text_cannot_inject_special_tokens(wordpiece_tokenizer, gpt2_tokenizer, bert_enc, gpt2_enc):
    tok = wordpiece_tokenizer
    text = "see [MASK] and [SEP] or [CLS]"
    row = bert_enc("[P:2] {text} It was [MASK] .").encode({"text": text})
    assert row.input_ids.count(tok.mask_token_id) == 1 and row.input_ids[row.answer_index] == tok.mask_token_id
    assert row.input_ids.count(tok.sep_token_id) == 1 and row.input_ids[-1] == tok.sep_token_id
    assert row.input_ids.count(tok.cls_token_id) == 1 and row.input_ids[0] == tok.cls_token_id
    assert "".join(tok.decode(field_tokens(row, 0)).split()) == "".join(text.lower().split())
    # Anchors are the author's: "[SEP]" written in the template stays the separator.
    row = bert_enc("{premise} [SEP] {hypothesis} [MASK]").encode({"premise": "a", "hypothesis": "b"})
    assert row.input_ids.count(tok.sep_token_id) == 2
    # GPT-2: "<|endoftext|>" in the data is text, not the end-of-text token.
    gtok = gpt2_tokenizer
    row = gpt2_enc("[P:2] {text} [MASK]").encode({"text": "before <|endoftext|> after"})
    assert gtok.eos_token_id not in field_tokens(row, 0)
    assert gtok.decode(field_tokens(row, 0)) == "before <|endoftext|> after"


def test_causal_template_with_field_after_mask_refused(gpt2_tokenizer, gpt2_spec, wordpiece_tokenizer, bert_spec):
    template = parse_template("{premise} [P:2] [MASK] , {hypothesis}")
    with pytest.raises(TemplateError, match="hypothesis"):
        TemplateEncoder(template, gpt2_tokenizer, gpt2_spec)
    # A masked LM sees both sides of [MASK]: fine there.
    row = TemplateEncoder(template, wordpiece_tokenizer, bert_spec).encode({"premise": "a", "hypothesis": "b"})
    assert row.input_ids[row.answer_index] == wordpiece_tokenizer.mask_token_id
    assert row.field_index.count(1) == 1


def test_causal_mask_with_nothing_before(gpt2_enc):
    with pytest.raises(EncodingError, match="first token"):
        gpt2_enc("{text} [MASK]").encode({"text": ""})
    # A virtual slot before [MASK] is something to read from.
    row = gpt2_enc("{text} [P:2] [MASK]").encode({"text": ""})
    assert row.prompt_index == [0, 1] and row.answer_index == 1


def test_tokenizer_required(gpt2_spec):
    with pytest.raises(ConfigError, match="tokenizer"):
        TemplateEncoder(parse_template("[P:1] {text}"), None, gpt2_spec)


# -- padding -------------------------------------------------------------------------


TEXTS = ["a", "a gem of a film", "", "one two three four five six seven eight nine"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_collate_padding(side, which, gpt2_enc, bert_enc):
    enc = (gpt2_enc if which == "gpt2" else bert_enc)("Review: [P:3] {text} [P:2] It was [MASK] .")
    rows = [enc.encode({"text": t}, index=i) for i, t in enumerate(TEXTS)]
    batch = enc.collate(rows, side)
    width = max(len(r.input_ids) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "prompt_index", "field_index", "word_index", "answer_index"}
    assert batch["input_ids"].shape == (len(rows), width) and batch["answer_index"].shape == (len(rows),)
    assert all(v.dtype == torch.long for v in batch.values())
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        pad = width - n
        span = slice(pad, width) if side == "left" else slice(0, n)
        assert batch["input_ids"][b, span].tolist() == row.input_ids
        assert batch["prompt_index"][b, span].tolist() == row.prompt_index
        assert batch["field_index"][b, span].tolist() == row.field_index
        assert batch["attention_mask"][b].tolist() == ([0] * pad + [1] * n if side == "left" else [1] * n + [0] * pad)
        # Virtual slots are never before (or among) pads.
        mask = batch["attention_mask"][b]
        assert bool((mask[batch["prompt_index"][b] >= 0] == 1).all())
        assert (batch["prompt_index"][b] >= 0).sum().item() == 5
        pads = (mask == 0).nonzero().flatten().tolist()
        slots = (batch["prompt_index"][b] >= 0).nonzero().flatten().tolist()
        if side == "left" and pads:
            assert max(pads) < min(slots)
        # The answer index moves with the left padding and still points at the same token.
        answer = batch["answer_index"][b].item()
        assert answer == row.answer_index + (pad if side == "left" else 0)
        assert batch["input_ids"][b, answer].item() == row.input_ids[row.answer_index]
        assert (batch["input_ids"][b, mask == 0] == enc.pad_id).all()
        assert (batch["prompt_index"][b, mask == 0] == -1).all()


def test_collate_errors(gpt2_enc):
    enc = gpt2_enc("[P:1] {text}")
    with pytest.raises(EncodingError, match="empty"):
        enc.collate([], "left")
    with pytest.raises(ConfigError, match="padding_side"):
        enc.collate([enc.encode({"text": "a"})], "middle")
    assert enc.collate([enc.encode({"text": "a"})], "left")["answer_index"].tolist() == [-1]  # no [MASK]


def test_model_encode_matches_encoder(gpt2_tokenizer):
    template = "[P:3] {text} [P:3] It was [MASK] ."
    model = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), sp.PTuningConfig(template=template), tokenizer=gpt2_tokenizer)
    examples = [{"text": t} for t in TEXTS]
    batch = model.encode(examples)  # causal: left padding by default
    enc = model.encoder
    expected = enc.collate([enc.encode(ex) for ex in examples], "left")
    assert set(batch) == set(expected)
    for key in expected:
        assert torch.equal(batch[key].cpu(), expected[key]), key
    assert batch["attention_mask"][:, -1].tolist() == [1] * len(TEXTS)  # every row ends at the right


# -- truncation ---------------------------------------------------------------------


def test_model_limit_counts_virtual_tokens_gpt2(gpt2_tokenizer, gpt2_enc):
    tok = gpt2_tokenizer
    enc = gpt2_enc("[P:3] {text} [P:3] It was [MASK] .")
    assert enc.max_length == 64
    full = ids(tok, LONG)
    row = enc.encode({"text": LONG})
    anchor = ids(tok, " It was")
    assert len(row.input_ids) == 64
    kept = 64 - 6 - len(anchor)
    assert row.input_ids == [tok.pad_token_id] * 3 + full[:kept] + [tok.pad_token_id] * 3 + anchor
    assert row.prompt_index == [0, 1, 2] + [-1] * kept + [3, 4, 5] + [-1] * len(anchor)
    assert row.answer_index == 63
    # max_length tightens the model's limit; a looser one does not loosen it.
    assert len(enc.encode({"text": LONG}, max_length=20).input_ids) == 20
    assert len(enc.encode({"text": LONG}, max_length=500).input_ids) == 64
    # Short inputs are left alone.
    assert enc.encode({"text": FILM}, max_length=20).input_ids == enc.encode({"text": FILM}).input_ids


def test_model_limit_counts_specials_bert(wordpiece_tokenizer, bert_enc):
    tok = wordpiece_tokenizer
    row = bert_enc("[P:4] {text} It was [MASK] .").encode({"text": LONG})
    assert len(row.input_ids) == 64
    assert row.input_ids[0] == tok.cls_token_id and row.input_ids[-1] == tok.sep_token_id
    assert row.input_ids[row.answer_index] == tok.mask_token_id
    assert row.prompt_index[1:5] == [0, 1, 2, 3]
    assert row.input_ids[-5:] == ids(tok, "It was") + [tok.mask_token_id] + ids(tok, ".") + [tok.sep_token_id]
    assert field_tokens(row, 0) == ids(tok, LONG)[: 64 - 2 - 4 - 4]


@pytest.mark.parametrize("P", [1, 10, 40])
def test_deep_prompt_positions_count(P, gpt2_tokenizer, gpt2_enc, bert_enc):
    enc = gpt2_enc("{text} It was [MASK]", deep_tokens=P)
    assert enc.max_length == 64 - P
    row = enc.encode({"text": LONG})
    assert len(row.input_ids) == 64 - P
    assert row.prompt_index == [-1] * (64 - P)  # a deep prompt has no input slots
    assert row.input_ids[-2:] == ids(gpt2_tokenizer, " It was")
    row = bert_enc("{text} [MASK]", deep_tokens=P).encode({"text": LONG})
    assert len(row.input_ids) == 64 - P


def test_longest_field_is_shortened_first(gpt2_tokenizer, gpt2_enc):
    enc = gpt2_enc("{premise} [P:2] Question: {hypothesis} ? [P:2] Answer: [MASK]")
    premise = "the quick brown fox jumps over the lazy dog " * 3  # 27 tokens: the row fits in 64
    hypothesis = "short one"
    full = enc.encode({"premise": premise, "hypothesis": hypothesis})
    p_full, h_full = field_tokens(full, 0), field_tokens(full, 1)
    fixed = len(full.input_ids) - len(p_full) - len(h_full)
    anchors = [t for t, f, p in zip(full.input_ids, full.field_index, full.prompt_index) if f < 0 and p < 0]

    # A small excess comes out of the long field only.
    row = enc.encode({"premise": premise, "hypothesis": hypothesis}, max_length=len(full.input_ids) - 10)
    assert len(row.input_ids) == len(full.input_ids) - 10
    assert field_tokens(row, 1) == h_full
    assert field_tokens(row, 0) == p_full[: len(p_full) - 10]
    assert len(h_full) == 2
    # Down to the short field's length, the short field stays whole.
    row = enc.encode({"premise": premise, "hypothesis": hypothesis}, max_length=fixed + 6)
    assert field_tokens(row, 0) == p_full[:4] and field_tokens(row, 1) == h_full
    # Beyond it, both are cut evenly, each keeping its beginning; anchors and slots intact.
    budget = 3
    row = enc.encode({"premise": premise, "hypothesis": hypothesis}, max_length=fixed + budget)
    p, h = field_tokens(row, 0), field_tokens(row, 1)
    assert len(p) + len(h) == budget and abs(len(p) - len(h)) <= 1
    assert p == p_full[: len(p)] and h == h_full[: len(h)]
    assert [t for t, f, q in zip(row.input_ids, row.field_index, row.prompt_index) if f < 0 and q < 0] == anchors
    assert [q for q in row.prompt_index if q >= 0] == [0, 1, 2, 3]
    assert row.answer_index == len(row.input_ids) - 1


def test_truncated_word_list_keeps_word_alignment(wordpiece_tokenizer, bert_enc):
    words = ["unbelievably"] * 30
    row = bert_enc("[P:2] {tokens}").encode({"tokens": words}, max_length=20)
    assert len(row.input_ids) == 20
    nos = [w for w in row.word_index if w >= 0]
    per_word = len(ids(wordpiece_tokenizer, "unbelievably"))
    assert nos == [k // per_word for k in range(20 - 2 - 2)]


def test_fixed_part_too_long_model_limit(gpt2_tokenizer, gpt2_enc):
    tok = gpt2_tokenizer
    anchor = " ".join(["filler"] * 70)
    enc = gpt2_enc(f"[P:3] {{text}} [P:3] {anchor} [MASK]")
    n_anchor = len(ids(tok, " " + anchor))
    with pytest.raises(EncodingError) as info:
        enc.encode({"text": "hi"}, index=3)
    msg = str(info.value)
    assert msg.startswith("example 3: ")
    assert "virtual tokens (6)" in msg and f"anchors ({n_anchor})" in msg and "special tokens (0)" in msg
    assert f"take {6 + n_anchor} of the 64 positions the model allows" in msg
    assert "max_length" not in msg
    assert "leaving no room for the input fields" in msg


def test_fixed_part_too_long_max_length(wordpiece_tokenizer, bert_enc):
    tok = wordpiece_tokenizer
    enc = bert_enc("[P:3] {text} [P:3] It was [MASK] .")
    n_anchor = len(ids(tok, "It was")) + len(ids(tok, "."))
    fixed = 6 + n_anchor + 3  # [CLS], [MASK], [SEP]
    with pytest.raises(EncodingError) as info:
        enc.encode({"text": "hi"}, max_length=10, index=0)
    msg = str(info.value)
    assert f"virtual tokens (6), anchors ({n_anchor}) and special tokens (3) take {fixed} of the 10 positions" in msg
    assert "max_length=10" in msg and "the model allows 64" in msg
    # Exactly the fixed part, with text: nothing left for the field -> refused.
    with pytest.raises(EncodingError, match="leaving no room"):
        enc.encode({"text": "hi"}, max_length=fixed)
    # Exactly the fixed part, with an empty field: fits.
    assert len(enc.encode({"text": ""}, max_length=fixed).input_ids) == fixed
    # One more position: one field token.
    row = enc.encode({"text": "hi there"}, max_length=fixed + 1)
    assert field_tokens(row, 0) == ids(tok, "hi")


def test_fixed_part_too_long_deep(gpt2_tokenizer, gpt2_enc):
    enc = gpt2_enc("{text} It was [MASK]", deep_tokens=62)
    with pytest.raises(EncodingError) as info:
        enc.encode({"text": "hi"}, index=5)
    msg = str(info.value)
    assert msg.startswith("example 5: ")
    assert "deep prompt (62)" in msg and "anchors (2)" in msg
    assert "take 64 of the 64 positions the model allows" in msg


@pytest.mark.parametrize("bad", [0, -3, "10", 2.5, True])
def test_max_length_must_be_positive_int(gpt2_enc, bad):
    with pytest.raises(EncodingError, match="max_length"):
        gpt2_enc("[P:1] {text}").encode({"text": "hi"}, max_length=bad)


# -- properties (GPT-2 BPE) ---------------------------------------------------------

ALPHABET = string.ascii_letters + string.digits + " .,!?'-:;()\"" + "éßü"
texts = st.text(alphabet=ALPHABET, max_size=60)
TEMPLATES = [
    # (template, anchors as the model sees them after the field, virtual layout)
    ("[P:2] {text} [P:1] It was [MASK] .", "It was"),
    ("Review: [P:3] {text} [P:2]", "Review:"),
    ("{text} [P:4]", ""),
]


def _layout(row: EncodedRow) -> list[str]:
    """The row as a string of kinds: V (virtual) F (field) A (anchor)."""
    return ["V" if p >= 0 else "F" if f >= 0 else "A" for p, f in zip(row.prompt_index, row.field_index)]


def _collapse(kinds: list[str]) -> str:
    out = []
    for k in kinds:
        if not out or out[-1] != k or k == "V":
            out.append(k)
    return "".join(out)


EXPECTED_SHAPE = {0: "VV F V A", 1: "A VVV F VV", 2: "F VVVV"}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(TEMPLATES) - 1), texts)
def test_property_bpe_round_trip(gpt2_tokenizer, gpt2_enc, which, text):
    tok = gpt2_tokenizer
    source, anchors = TEMPLATES[which]
    enc = gpt2_enc(source)
    row = enc.encode({"text": text})
    check_lengths(row)
    decoded = tok.decode(real_ids(row, tok), clean_up_tokenization_spaces=False)
    expected = ("Review: " + text) if which == 1 else (text + " " + anchors)
    assert squash(decoded) == squash(expected)
    # The virtual slots are exactly where the template puts them, numbered in order.
    assert [p for p in row.prompt_index if p >= 0] == list(range(enc.template.num_virtual_tokens))
    shape = EXPECTED_SHAPE[which].replace(" ", "")
    if not field_tokens(row, 0):
        shape = shape.replace("F", "")
    assert _collapse(_layout(row)) == shape


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(TEMPLATES) - 1), texts, st.integers(1, 40))
def test_property_truncation(gpt2_tokenizer, gpt2_enc, which, text, max_length):
    enc = gpt2_enc(TEMPLATES[which][0])
    full = enc.encode({"text": text})
    f_full = field_tokens(full, 0)
    fixed = len(full.input_ids) - len(f_full)
    try:
        row = enc.encode({"text": text}, max_length=max_length)
    except EncodingError as err:
        assert max_length < fixed or (max_length == fixed and f_full), str(err)
        assert f"of the {max_length} positions that max_length={max_length} allows" in str(err)
        return
    assert not (max_length < fixed or (max_length == fixed and f_full))
    assert len(row.input_ids) == min(len(full.input_ids), max_length)
    f = field_tokens(row, 0)
    assert f == f_full[: len(f)]
    # Everything but the field is unchanged, in order.
    keep = lambda r: [(t, p) for t, p, fi in zip(r.input_ids, r.prompt_index, r.field_index) if fi < 0]
    assert keep(row) == keep(full)
    if len(full.input_ids) <= max_length:
        assert row == full


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet=string.ascii_letters + " .,!'[]<>|" + "éß", max_size=30), min_size=1, max_size=6))
def test_pretokenized_batch_gives_the_ids_of_one_by_one(gpt2_enc, bert_enc, texts):
    """The engine tokenizes a batch's field values in one call (`pretokenized`): every row
    encodes exactly as it does alone, special-token text ("[MASK]", "<|endoftext|>") and
    word-boundary forms included."""
    texts = texts + ["[MASK] <|endoftext|> [SEP]"]
    for make in (gpt2_enc, bert_enc):
        enc = make("{a} [P:2] and {b} ? [MASK]")  # a field at the start, one after a word
        fields = enc.template.fields
        examples = [{f: t for f in fields} for t in texts]
        alone = [enc.encode(e) for e in examples]
        with enc.pretokenized(texts):
            assert enc._local.memo  # the batch was tokenized once ...
            batched = [enc.encode(e) for e in examples]
        assert batched == alone  # ... and gave every row its own ids
        assert enc._local.memo is None
