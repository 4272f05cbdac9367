"""Task heads on tiny models: every loss equals an independently computed value, a few
optimisation steps lower it, metrics match hand-made cases, configs round-trip, and bad
input is refused with an error that names the problem.

The independent references never go through `tasks/scoring.py`: multi-token scores are
rebuilt one row at a time by appending tokens and re-running the full forward (as
tests/test_contract.py::_greedy_by_forwards does), and labels from the tokenizer alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softprompt as sp
from softprompt.tasks import (
    TASKS,
    Generation,
    KnowledgeProbe,
    TokenClassification,
    Verbalizer,
    lama_template,
    sequence_log_probs,
    task_from_config,
)
from softprompt.tasks.metrics import generation_metrics

from conftest import make_bert, make_gpt2, make_llama, make_t5

TEXTS = [{"text": "a gem of a film", "label": "pos"}, {"text": "bad", "label": "neg"},
         {"text": "the plot wanders but the cast holds it together", "label": "pos"}, {"text": "dull", "label": "neg"}]

CAUSAL_METHODS = {
    "p-tuning": lambda t: sp.PTuningConfig(template="[P:2] " + t, encoder="mlp", encoder_hidden_size=16),
    "p-tuning-v2": lambda t: sp.PTuningV2Config(num_virtual_tokens=3, template=t, init_std=0.5),
    # the answer slot is a virtual token: the first word token must come from answer_logits
    "slot-is-virtual": lambda t: sp.PromptTuningConfig(template=t.replace(" [MASK]", " [P:2] [MASK]"), init="vocab"),
}


def build(base, tok, config):
    torch.manual_seed(0)
    return sp.SoftPromptModel(base, config, tokenizer=tok).eval()


def row_batch(model, example):
    return model.encode([example])


@torch.no_grad()
def manual_log_prob(model, example, ids):
    """log p(ids | row) by repeated full forwards over one unpadded row."""
    batch = row_batch(model, example)
    lp = model(**batch).answer_logits.float().log_softmax(-1)[0, ids[0]]
    input_ids, mask, pindex = batch["input_ids"], batch["attention_mask"], batch["prompt_index"]
    for j in range(1, len(ids)):
        extra = torch.tensor([ids[:j]])
        out = model(input_ids=torch.cat([input_ids, extra], 1), attention_mask=torch.cat([mask, torch.ones_like(extra)], 1),
                    prompt_index=torch.cat([pindex, torch.full_like(extra, -1)], 1))
        lp = lp + out.logits[0, -1].float().log_softmax(-1)[ids[j]]
    return lp


def bpe(tok, word):
    return tok(" " + word, add_special_tokens=False)["input_ids"]


def trainable(model, task):
    return [p for p in list(model.parameters()) + list(task.parameters()) if p.requires_grad]


def loss_drops(model, task, examples, steps=8, lr=5e-2):
    """Loss on `examples` before and after a few AdamW steps on them (dropout off)."""
    batch, targets = task.collate(model, examples)
    optimizer = torch.optim.AdamW(trainable(model, task), lr=lr)
    with torch.no_grad():
        before = float(task.loss(model, batch, targets).detach())
    for _ in range(steps):
        optimizer.zero_grad()
        task.loss(model, batch, targets).backward()
        optimizer.step()
    with torch.no_grad():
        after = float(task.loss(model, batch, targets).detach())
    return before, after


def roundtrip(task):
    config = task.to_config()
    again = task_from_config(config)
    assert type(again) is type(task) and again.to_config() == config
    return again


def test_registered():
    assert {"verbalizer", "ner", "generation", "lama", "classification"} <= set(TASKS)


# -- verbalizer ---------------------------------------------------------------------
def test_verbalizer_masked_lm_loss_is_pet_cross_entropy(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    model = build(make_bert(tok), tok, sp.PTuningConfig(template="[P:2] {text} [P:1] It was [MASK] .",
                                                        encoder="mlp", encoder_hidden_size=16))
    task = Verbalizer({"neg": ["terrible", "awful"], "pos": "great"})
    task.bind(model)
    batch, targets = task.collate(model, TEXTS)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("terrible", "awful", "great")}
    logp = model(**batch).answer_logits.float().log_softmax(-1)
    scores = torch.stack([torch.logsumexp(logp[:, [ids["terrible"], ids["awful"]]], -1), logp[:, ids["great"]]], -1)
    gold = torch.tensor([1, 0, 1, 0])
    assert torch.equal(targets["labels"], gold)
    assert torch.allclose(task.loss(model, batch, targets), F.cross_entropy(scores, gold), atol=1e-6)
    # PET: the same as cross-entropy over the raw logits of the label words (single words)
    single = Verbalizer({"neg": "terrible", "pos": "great"})
    single.bind(model)
    raw = model(**batch).answer_logits[:, [ids["terrible"], ids["great"]]]
    assert torch.allclose(single.loss(model, batch, targets), F.cross_entropy(raw.float(), gold), atol=1e-5)
    predictions = task.predict(model, batch)
    assert [p["label"] for p in predictions] == [["neg", "pos"][int(i)] for i in scores.argmax(-1)]
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-4 for p in predictions)


@pytest.mark.parametrize("method", list(CAUSAL_METHODS))
def test_verbalizer_causal_multi_token_equals_repeated_forwards(gpt2_tokenizer, method):
    tok = gpt2_tokenizer
    model = build(make_gpt2(tok), tok, CAUSAL_METHODS[method]("{text} It was [MASK] ."))
    words = {"pos": ["great", "Reykjavik"], "neg": ["Gdansk", "New York", "New"]}
    task = Verbalizer(words)
    task.bind(model)
    assert [len(ids) for ids in task.word_ids] == [1, 4, 3, 2, 1]  # multi-token words, shared " New"
    batch, targets = task.collate(model, TEXTS[:3])  # left padded, different lengths
    got = task.word_scores(model, batch)  # (B, W)
    flat = [w for ws in words.values() for w in ws]
    expected = torch.stack([torch.stack([manual_log_prob(model, ex, bpe(tok, w)) for w in flat]) for ex in TEXTS[:3]])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    scores = torch.stack([expected[:, :2].logsumexp(-1), expected[:, 2:].logsumexp(-1)], -1)
    assert torch.allclose(task.loss(model, batch, targets), F.cross_entropy(scores, targets["labels"]), atol=1e-4)
    best = task.__class__(words, aggregate="max")
    best.bind(model)
    by_max = torch.stack([expected[:, :2].max(-1).values, expected[:, 2:].max(-1).values], -1)
    assert torch.allclose(best.scores(model, batch), by_max, atol=1e-4)


def test_verbalizer_training_lowers_loss(gpt2_tokenizer, wordpiece_tokenizer):
    tok = gpt2_tokenizer
    model = build(make_gpt2(tok), tok, CAUSAL_METHODS["p-tuning"]("{text} It was [MASK] ."))
    task = Verbalizer({"pos": ["great", "Reykjavik"], "neg": ["New York"]})
    task.bind(model)
    before, after = loss_drops(model, task, TEXTS)
    assert after < before
    model = build(make_bert(wordpiece_tokenizer), wordpiece_tokenizer,
                  sp.PTuningV2Config(num_virtual_tokens=3, template="{text} It was [MASK] .", init_std=0.5))
    task = Verbalizer({"pos": "great", "neg": "terrible"})
    task.bind(model)
    before, after = loss_drops(model, task, TEXTS)
    assert after < before


def test_verbalizer_errors(gpt2_tokenizer, wordpiece_tokenizer):
    wp = wordpiece_tokenizer
    bert = build(make_bert(wp), wp, sp.PTuningV2Config(num_virtual_tokens=2, template="{text} It was [MASK] ."))
    no_mask = build(make_bert(wp), wp, sp.PTuningV2Config(num_virtual_tokens=2, template="{text} It was good ."))
    with pytest.raises(sp.ConfigError, match=r"\[MASK\].*'\{text\} It was good \.'"):
        Verbalizer({"pos": "great", "neg": "bad"}).bind(no_mask)
    with pytest.raises(sp.ConfigError, match=r"'mediocre' is 3 tokens"):
        Verbalizer({"pos": "great", "neg": ["bad", "mediocre"]}).bind(bert)
    with pytest.raises(sp.ConfigError, match=r"'\\u200b' tokenizes to nothing"):
        Verbalizer({"pos": "great", "neg": "\u200b"}).bind(bert)
    with pytest.raises(sp.ConfigError, match=r"not in the vocabulary"):
        Verbalizer({"pos": "great", "neg": "\u2603"}).bind(bert)
    with pytest.raises(sp.ConfigError, match=r"could not be told apart"):
        Verbalizer({"pos": "great", "neg": "GREAT"}).bind(bert)  # uncased: the same token
    with pytest.raises(sp.ConfigError, match="at least two labels"):
        Verbalizer({"pos": "great"})
    task = Verbalizer({"pos": "great", "neg": "bad"})
    task.bind(bert)
    with pytest.raises(sp.EncodingError, match=r"example 1: unknown label 'meh'"):
        task.collate(bert, [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])
    t5 = build(make_t5(wp), wp, sp.PTuningV2Config(num_virtual_tokens=2, template="{text} It was [MASK] ."))
    with pytest.raises(sp.UnsupportedModelError, match="encoder-decoder"):
        task.bind(t5)
    again = roundtrip(Verbalizer({"pos": ["great", "fine"], "neg": "bad"}, aggregate="max"))
    assert again.label_words == {"pos": ["great", "fine"], "neg": ["bad"]}


# -- token classification -----------------------------------------------------------
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
NER = [
    {"tokens": ["Kowalczyk", "visited", "Sarajevo", "yesterday"], "tags": ["B-PER", "O", "B-LOC", "O"]},
    {"tokens": ["unbelievableness", "at", "Google"], "tags": ["O", "O", "B-ORG"]},
    {"tokens": ["Anna", "Maria", "Kowalczyk"], "tags": ["B-PER", "I-PER", "I-PER"]},
    {"tokens": ["mediocre", "food", "in", "New", "York"], "tags": ["O", "O", "O", "B-LOC", "I-LOC"]},
]
NER_METHODS = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(template="[P:2] {tokens} [P:1]", init="vocab"),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=3, template="{tokens}", init_std=0.5),
}


@pytest.mark.parametrize("method", list(NER_METHODS))
def test_ner_labels_on_first_subtokens_only(wordpiece_tokenizer, method):
    tok = wordpiece_tokenizer
    model = build(make_bert(tok), tok, NER_METHODS[method]())
    task = TokenClassification(TAGS)
    task.bind(model)
    batch, targets = task.collate(model, NER)
    labels = targets["labels"]
    out = model(**batch, output_hidden_states=True)
    assert labels.shape == out.attention_mask.shape  # aligned to the real tokens
    for i, ex in enumerate(NER):  # built from the tokenizer alone: [CLS] words... [SEP], right padded
        expected = [-100]
        for word, tag in zip(ex["tokens"], ex["tags"]):
            expected += [TAGS.index(tag)] + [-100] * (len(tok.tokenize(word)) - 1)
        expected += [-100]
        expected += [-100] * (labels.shape[1] - len(expected))
        assert labels[i].tolist() == expected
    assert any(len(tok.tokenize(w)) > 1 for ex in NER for w in ex["tokens"])
    # the loss is the cross-entropy of the head over the labelled positions
    task.eval()
    logits = task.head(out.last_hidden_state.float())
    manual = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    assert torch.allclose(task.loss(model, batch, targets), manual, atol=1e-6)
    predictions = task.predict(model, task.collate(model, NER, with_targets=False)[0])
    assert [len(p) for p in predictions] == [len(ex["tokens"]) for ex in NER]
    assert all(t in TAGS for p in predictions for t in p)
    best = logits.argmax(-1)
    for i, p in enumerate(predictions):  # each word's tag is read at its first sub-token
        firsts = (labels[i] != -100).nonzero().flatten()
        assert p == [TAGS[int(best[i, c])] for c in firsts]


def test_ner_truncated_words_predicted_outside(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    model = build(make_bert(tok), tok, NER_METHODS["prompt-tuning"]())
    task = TokenClassification(TAGS, max_length=7)  # 3 virtual + [CLS] + [SEP]: 2 word tokens
    task.bind(model)
    batch, targets = task.collate(model, NER[:2])
    assert int((targets["labels"][0] != -100).sum()) == 1  # "Kowalczyk" keeps 2 of its 4 pieces
    predictions = task.predict(model, batch)
    assert [len(p) for p in predictions] == [4, 3]
    assert predictions[0][1:] == ["O", "O", "O"] and predictions[1][2:] == ["O"]
    assert task.predict(model, batch.to("cpu")) == predictions  # moving the batch keeps its word counts
    # the truncated entities count as missed
    scores = task.metrics([["B-PER"], ["O", "O"]], [task.reference(e) for e in NER[:2]])
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(1 / 3)


def test_ner_training_lowers_loss_and_roundtrips(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    model = build(make_bert(tok), tok, NER_METHODS["p-tuning-v2"]())
    task = TokenClassification(TAGS, dropout=0.0)
    task.bind(model)
    before, after = loss_drops(model, task, NER, lr=5e-2)
    assert after < 0.8 * before
    again = roundtrip(task)
    again.bind(model)
    again.load_state_dict(task.state_dict())
    batch, _ = task.collate(model, NER, with_targets=False)
    assert again.predict(model, batch) == task.predict(model, batch)
    assert set(task.state_dict()) == {"head.weight", "head.bias"}


def test_ner_metrics_seqeval_hand_made():
    task = TokenClassification(TAGS)
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    scores = task.metrics(pred, gold)
    # entities: gold {PER, LOC, ORG}; predicted {PER, ORG, LOC(wrong place)}: tp 2, fp 1, fn 1
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert task.metrics([["B-PER", "I-PER"]], [["B-PER", "I-PER", "O"]])["f1"] == 1.0  # short prediction: "O"


def test_ner_errors(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    model = build(make_bert(tok), tok, NER_METHODS["p-tuning-v2"]())
    task = TokenClassification(TAGS)
    task.bind(model)
    with pytest.raises(sp.EncodingError, match=r"example 1: unknown tag 'B-MISC' \(word 0, 'Berlin'\)"):
        task.collate(model, [NER[0], {"tokens": ["Berlin"], "tags": ["B-MISC"]}])
    with pytest.raises(sp.EncodingError, match=r"example 0: 1 tags for 2 words"):
        task.collate(model, [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(sp.EncodingError, match=r"example 0 has no 'tokens' field"):
        task.collate(model, [{"words": ["a"], "tags": ["O"]}])
    with pytest.raises(sp.EncodingError, match="list of words"):
        task.collate(model, [{"tokens": "a b", "tags": ["O", "O"]}])
    other = build(make_bert(tok), tok, sp.PTuningV2Config(num_virtual_tokens=3, template="{words}"))
    with pytest.raises(sp.ConfigError, match=r"field 'tokens'.*'\{words\}'"):
        TokenClassification(TAGS).bind(other)
    custom = TokenClassification(TAGS, field="words", tags_field="labels")
    custom.bind(other)
    _, targets = custom.collate(other, [{"words": ["New", "York"], "labels": ["B-LOC", "I-LOC"]}])
    assert (targets["labels"] != -100).sum() == 2
    assert roundtrip(custom).field == "words"


# -- generation ---------------------------------------------------------------------
GEN = [{"input": "Question: capital of France? Answer:", "target": "Paris"},
       {"input": "Say hi:", "target": "hello there friend"},
       {"input": "2 + 2 =", "target": "4"}, {"input": "Color of the sky:", "target": "blue"}]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_causal_loss_counts_only_target_tokens(gpt2_tokenizer, family):
    tok = gpt2_tokenizer
    base = (make_gpt2 if family == "gpt2" else make_llama)(tok)
    model = build(base, tok, sp.PromptTuningConfig(template="[P:3] {input}", init="vocab"))
    task = Generation(max_new_tokens=4)
    task.bind(model)
    eos = base.generation_config.eos_token_id
    batch, targets = task.collate(model, GEN)
    total, count = 0.0, 0
    for ex in GEN:  # each row alone: the encoded input, then the target and EOS, by hand
        row = model.encode([ex])
        target = bpe(tok, ex["target"]) + [eos]
        extra = torch.tensor([target])
        out = model(input_ids=torch.cat([row["input_ids"], extra], 1),
                    attention_mask=torch.cat([row["attention_mask"], torch.ones_like(extra)], 1),
                    prompt_index=torch.cat([row["prompt_index"], torch.full_like(extra, -1)], 1))
        logp = out.logits[0].float().log_softmax(-1)
        T, n = logp.shape[0], len(target)
        total -= sum(float(logp[T - n - 1 + j, target[j]].detach()) for j in range(n))
        count += n
    assert int((targets["labels"] != -100).sum()) == count
    assert float(task.loss(model, batch, targets).detach()) == pytest.approx(total / count, abs=1e-4)


def test_generation_seq2seq_loss_and_predict(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    base = make_t5(tok)
    model = build(base, tok, sp.PTuningV2Config(num_virtual_tokens=3, template="{input}", init_std=0.5))
    task = Generation(max_new_tokens=3)
    task.bind(model)
    assert task.eos_id == tok.sep_token_id  # what T5's config stops on
    batch, targets = task.collate(model, GEN)
    total, count = 0.0, 0
    for ex in GEN:
        target = tok(ex["target"], add_special_tokens=False)["input_ids"] + [task.eos_id]
        decoder = torch.tensor([[base.config.decoder_start_token_id] + target[:-1]])
        logits = model(**model.encode([ex]), decoder_input_ids=decoder).logits[0].float()
        total -= sum(float(logits[j].log_softmax(-1)[target[j]].detach()) for j in range(len(target)))
        count += len(target)
    assert float(task.loss(model, batch, targets).detach()) == pytest.approx(total / count, abs=1e-4)
    inputs, _ = task.collate(model, GEN, with_targets=False)
    predictions = task.predict(model, inputs)
    new = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=task.eos_id)
    for p, row in zip(predictions, new.tolist()):
        row = row[: row.index(task.eos_id)] if task.eos_id in row else row
        assert p == tok.decode(row, skip_special_tokens=True).strip()
    before, after = loss_drops(model, task, GEN, lr=5e-2)
    assert after < before


def test_generation_causal_predict_and_training(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = build(make_gpt2(tok), tok, sp.PTuningConfig(template="[P:2] {input} [P:2]", encoder="mlp",
                                                       encoder_hidden_size=16))
    task = Generation(max_new_tokens=4)
    task.bind(model)
    inputs, _ = task.collate(model, GEN, with_targets=False)
    predictions = task.predict(model, inputs)
    assert len(predictions) == 4 and all(isinstance(p, str) and p == p.strip() for p in predictions)
    new = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=task.eos_id)
    first = new[0].tolist()
    first = first[: first.index(task.eos_id)] if task.eos_id in first else first
    assert predictions[0] == tok.decode(first, skip_special_tokens=True).strip()
    before, after = loss_drops(model, task, GEN, lr=5e-2)
    assert after < before
    assert task.metrics(predictions, [task.reference(e) for e in GEN])["n"] == 4
    again = roundtrip(Generation(max_new_tokens=7, target_field="answer", max_target_length=5))
    assert again.max_new_tokens == 7 and again.target_field == "answer"


def test_generation_metrics_hand_made():
    scores = generation_metrics(["The Cat", "a dog ran", ""], ["cat", "dog", "nothing"])
    # "The Cat" -> [cat] == [cat]; "a dog ran" -> [dog, ran] vs [dog]: P 1/2, R 1, F1 2/3; "" vs [nothing]: 0
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert Generation().metrics(["Paris"], ["paris."])["exact_match"] == 1.0


def test_generation_errors(gpt2_tokenizer, wordpiece_tokenizer):
    tok = gpt2_tokenizer
    model = build(make_gpt2(tok), tok, sp.PromptTuningConfig(template="[P:2] {input}"))
    task = Generation()
    with pytest.raises(sp.ConfigError, match="bind"):
        task.collate(model, GEN)
    task.bind(model)
    with pytest.raises(sp.EncodingError, match=r"example 1 has no 'target' field"):
        task.collate(model, [GEN[0], {"input": "x"}])
    with pytest.raises(sp.EncodingError, match=r"example 0: 'target' must be a string"):
        task.collate(model, [{"input": "x", "target": 3}])
    bert = build(make_bert(wordpiece_tokenizer), wordpiece_tokenizer, sp.PTuningV2Config(num_virtual_tokens=2))
    with pytest.raises(sp.UnsupportedModelError, match="encoder"):
        Generation().bind(bert)
    with pytest.raises(sp.ConfigError, match="max_new_tokens"):
        Generation(max_new_tokens=0)
    # the input is shortened so that input + target fit the 64 positions of the tiny GPT-2
    long = [{"input": "word " * 100, "target": "Paris"}]
    batch, targets = task.collate(model, long)
    assert batch["input_ids"].shape[1] == 64 and int((targets["labels"] != -100).sum()) == 2


# -- LAMA ---------------------------------------------------------------------------
FACTS = [{"X": "Moe Koffman", "Y": "Toronto"}, {"X": "Paul Mounsey", "Y": "Scotland"},
         {"X": "Allan Peiper", "Y": "Reykjavik"}, {"X": "Dante", "Y": "New York"}]


def test_lama_template():
    assert lama_template("[X] was born in [Y] .") == "{X} was born in [MASK] ."
    assert lama_template("[P:3] [X] [P:3] [Y]") == "[P:3] {X} [P:3] [MASK]"
    assert lama_template("{[X]} is [Y]") == "{{{X}}} is [MASK]"
    assert sp.parse_template(lama_template("{[X]} is [Y]")).fields == ("X",)
    with pytest.raises(sp.TemplateError, match=r"\[Y\] exactly once"):
        lama_template("[X] was born .")
    with pytest.raises(sp.TemplateError, match=r"\[X\] exactly once"):
        lama_template("[X] and [X] in [Y]")


def test_lama_masked_lm_single_token_candidates(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    model = build(make_bert(tok), tok, sp.PTuningV2Config(num_virtual_tokens=3, init_std=0.5,
                                                          template=lama_template("[X] was born in [Y] .")))
    task = KnowledgeProbe(["Toronto", "Scotland", "Kowalczyk", "toronto", "Paris", "Reykjavik"], top_k=2)
    task.bind(model)
    assert task.dropped == ["Kowalczyk"]  # 4 WordPiece tokens; "toronto" merged into "Toronto"
    facts = FACTS[:3]
    batch, targets = task.collate(model, facts)
    ids = tok.convert_tokens_to_ids(["toronto", "scotland", "paris", "reykjavik"])
    logits = model(**batch).answer_logits.float()
    assert torch.equal(targets["object_ids"], torch.tensor(ids[:2] + ids[3:]))
    assert torch.allclose(task.loss(model, batch, targets), F.cross_entropy(logits, targets["object_ids"]))
    predictions = task.predict(model, batch)
    names = ["Toronto", "Scotland", "Paris", "Reykjavik"]
    assert [p["object"] for p in predictions] == [names[int(i)] for i in logits[:, ids].argmax(-1)]
    assert all(len(p["top"]) == 2 for p in predictions)
    assert task.reference({"X": "a", "Y": "TORONTO"}) == "Toronto"  # spelt as predict spells it
    scores = task.metrics([{"object": "Toronto", "top": ["Toronto", "Paris"]}, {"object": "Paris", "top": ["Paris", "Scotland"]},
                           {"object": "Paris", "top": ["Paris", "Toronto"]}], ["Toronto", "Scotland", "Oslo"])
    assert scores["precision_at_1"] == pytest.approx(1 / 3) and scores["precision_at_2"] == pytest.approx(2 / 3)
    assert scores["coverage"] == pytest.approx(2 / 3)
    before, after = loss_drops(model, task, facts)
    assert after < before
    with pytest.raises(sp.EncodingError, match=r"example 0: object 'Kowalczyk' is 4 tokens"):
        task.collate(model, [{"X": "a", "Y": "Kowalczyk"}])
    with pytest.raises(sp.EncodingError, match=r"example 0 has no 'Y' field"):
        task.collate(model, [{"X": "a"}])


def test_lama_causal_scores_whole_strings(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = build(make_gpt2(tok), tok, sp.PTuningConfig(template="[P:2] " + lama_template("[X] was born in [Y] ."),
                                                       encoder="mlp", encoder_hidden_size=16))
    candidates = ["Toronto", "Scotland", "Reykjavik", "New York", "New", "Gdansk"]
    task = KnowledgeProbe(candidates, top_k=3, chunk_size=5)  # several chunks
    task.bind(model)
    assert task.dropped == []
    batch, targets = task.collate(model, FACTS)
    expected = torch.stack([torch.stack([manual_log_prob(model, f, bpe(tok, c)) for c in candidates]) for f in FACTS])
    got = sequence_log_probs(model, batch, [bpe(tok, c) for c in candidates], chunk_size=5)
    assert torch.allclose(got, expected, atol=1e-4)
    predictions = task.predict(model, batch)
    assert [p["object"] for p in predictions] == [candidates[int(i)] for i in expected.argmax(-1)]
    gold = torch.stack([manual_log_prob(model, f, bpe(tok, f["Y"])) for f in FACTS])
    assert float(task.loss(model, batch, targets).detach()) == pytest.approx(float(-gold.mean()), abs=1e-4)
    before, after = loss_drops(model, task, FACTS, lr=5e-2)
    assert after < before
    again = roundtrip(task)
    again.bind(model)
    assert again.predict(model, batch) == task.predict(model, batch)
    # open vocabulary: the argmax token at the slot
    open_vocab = KnowledgeProbe(None)
    open_vocab.bind(model)
    top = model(**batch).answer_logits.argmax(-1)
    assert [p["object"] for p in open_vocab.predict(model, batch)] == [tok.decode([int(t)]).strip() for t in top]
    assert open_vocab.reference({"X": "a", "Y": "Toronto"}) == "Toronto"
    # single_token (LAMA-29k style): only one-token candidates, scored from the row's own forward
    one = KnowledgeProbe(candidates, top_k=2, single_token=True)
    one.bind(model)
    kept = [c for c in candidates if len(bpe(tok, c)) == 1]
    assert one.dropped == [c for c in candidates if c not in kept] and one.dropped
    slot = model(**batch).answer_logits.log_softmax(-1)  # (B, V)
    ids = torch.tensor([bpe(tok, c)[0] for c in kept])
    assert [p["object"] for p in one.predict(model, batch)] == [kept[int(i)] for i in slot[:, ids].argmax(-1)]
    assert roundtrip(one).single_token is True


def test_lama_errors(gpt2_tokenizer, tmp_path):
    tok = gpt2_tokenizer
    model = build(make_gpt2(tok), tok, sp.PromptTuningConfig(template="[P:2] {X} lives in [MASK]"))
    with pytest.raises(sp.ConfigError, match="fields \\['X'\\]"):
        KnowledgeProbe(["Paris"], subject_field="subject").bind(model)
    no_mask = build(make_gpt2(tok), tok, sp.PromptTuningConfig(template="[P:2] {X} lives here"))
    with pytest.raises(sp.ConfigError, match=r"has no \[MASK\]"):
        KnowledgeProbe(["Paris"]).bind(no_mask)
    with pytest.raises(sp.ConfigError, match="empty"):
        KnowledgeProbe([" ", ""])
    with pytest.raises(sp.ConfigError, match="missing.txt"):
        KnowledgeProbe(str(tmp_path / "missing.txt"))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("Paris\n\nToronto\n")
    assert KnowledgeProbe(str(vocab)).candidates == ["Paris", "Toronto"]
    task = KnowledgeProbe(["Paris"])
    with pytest.raises(sp.ConfigError, match="bind"):
        task.predict(model, model.encode([{"X": "a"}]))


# -- through the training loop ------------------------------------------------------
@pytest.mark.parametrize("kind", ["verbalizer", "ner", "generation", "lama"])
def test_task_trains_saves_and_reloads_through_the_loop(gpt2_tokenizer, wordpiece_tokenizer, tmp_path, kind):
    """`train` drives each task (collate / loss / predict / metrics), saves it with its
    head, and the saved task.json + head rebuild the same predictions."""
    import json

    from softprompt.io.atomic import load_tensors
    from softprompt.training.config import TrainConfig
    from softprompt.training.evaluate import evaluate
    from softprompt.training.loop import train

    if kind == "ner":
        tok = wordpiece_tokenizer
        model = build(make_bert(tok), tok, NER_METHODS["p-tuning-v2"]())
        task, data = TokenClassification(TAGS), NER
    else:
        tok = gpt2_tokenizer
        template = {"verbalizer": "{text} It was [MASK] .", "generation": "{input}",
                    "lama": lama_template("[X] was born in [Y] .")}[kind]
        model = build(make_gpt2(tok), tok, CAUSAL_METHODS["p-tuning"](template))
        task, data = {"verbalizer": (Verbalizer({"pos": ["great", "Reykjavik"], "neg": "New York"}), TEXTS),
                      "generation": (Generation(max_new_tokens=3), GEN),
                      "lama": (KnowledgeProbe(["Toronto", "Scotland", "Reykjavik", "New York"]), FACTS)}[kind]
    config = TrainConfig(steps=2, batch_size=2, lr=1e-2, head_lr=1e-2, eval_every=2, progress=False, seed=0)
    result = train(model, task, data, data, config, tmp_path)
    assert result.steps == 2 and result.best_metric is not None
    saved = tmp_path / "prompt"
    again = task_from_config(json.loads((saved / "task.json").read_text()))
    again.bind(model)
    if (saved / "head.safetensors").exists():
        again.load_state_dict(load_tensors(saved / "head.safetensors"))
    assert (saved / "head.safetensors").exists() == (kind == "ner")  # only NER has parameters
    scores, predictions = evaluate(model, task, data)
    scores_again, predictions_again = evaluate(model, again, data)
    assert predictions_again == predictions and scores_again == scores and task.metric in scores
