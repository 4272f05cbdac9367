"""Short joins padded to buckets of rows and length (`serve/graphed.py`), the shapes the
decoder's prefill graphs are captured for. The CUDA graphs themselves need a GPU (their
first tokens against the eager prefill's are checked by `bench.probe.prefill`); the padded
forward they record runs here eagerly, on the CPU: each row must equal the row alone."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.serve import Engine, PromptBank, Request, encode_mixed, forward_mixed
from softprompt.serve.decode import Decoder, DecodeRow, Sampling
from softprompt.serve.graphed import LENGTH_BUCKETS, ROW_BUCKETS, HeadGraphs, PrefillGraphs, bucket
from softprompt.tasks import SequenceClassification, TokenClassification, Verbalizer
from softprompt.serve.prefill import Prefill

from test_serve_slots import alone, bank_of

PADDABLE = ("gpt2", "llama", "qwen2")


def test_buckets():
    assert [bucket(n, ROW_BUCKETS) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert [bucket(n, LENGTH_BUCKETS) for n in (1, 16, 17, 49, 97, 129, 300, 512, 513)] == [16, 16, 32, 64, 112, 160, 320, 512, None]


def test_joins_beyond_the_token_budget_are_not_padded(family_models):
    bank, models, tok = bank_of(family_models, "llama")
    graphs = PrefillGraphs(bank, max_tokens=256, capture=False)
    assert graphs.shape(3, 20) == (4, 32)
    assert graphs.shape(8, 32) == (8, 32)  # 256 padded tokens: in
    assert graphs.shape(5, 40) is None  # 8 x 48 > 256: the caller's eager prefill
    assert graphs.shape(1, 600) is None  # longer than the longest bucket
    graphs.enabled = False
    assert graphs.shape(1, 1) is None


@pytest.mark.parametrize("family", PADDABLE)
def test_padded_joins_give_each_row_what_it_gets_alone(family_models, family, monkeypatch):
    """Joins of 1, 2, 3 and 5 rows (padded to 1, 2, 4 and 8 rows and to 16 or 32 columns)
    of input prompts, P-tuning with anchors, deep prompts and all three mixed: each row's
    greedy tokens equal generate() on the row alone, and every join went through the
    padded forward."""
    bank, models, tok = bank_of(family_models, family)
    calls = []
    original = PrefillGraphs.__call__
    monkeypatch.setattr(PrefillGraphs, "__call__", lambda self, batch: calls.append(batch) or original(self, batch))
    decoder = Decoder(bank, max_rows=5, graphs=False, padded_prefill=True)
    joins = [["deep"], ["short", "mid"], ["mid", "deep", "short"], ["deep", "short", "deep", "mid", "short"]]
    for i, names in enumerate(joins):
        texts = [" ".join(["word"] * (1 + 2 * i + 3 * j)) for j in range(len(names))]
        rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=4)) for t, x in zip(names, texts)]
        decoder.run(rows)
        for row, task, text in zip(rows, names, texts):
            assert row.error is None and row.tokens == alone(models[task], {"text": text}, 4, None)[:4], (task, text)
    assert len(calls) == len(joins)


@pytest.mark.parametrize("family", PADDABLE)
def test_padded_joins_with_dept_rows_give_each_row_what_it_gets_alone(family_models, family):
    """A DePT task's rows join through the padded forward beside input and deep prompts
    (its delta gathered per row, the pads the bucket adds counted out): greedy tokens ==
    the row alone."""
    bank, models, tok = bank_of(family_models, family)
    models["dept"] = sp.SoftPromptModel(bank.base, sp.DePTConfig(template="[P:2] {text}", rank=2, max_input_length=4),
                                        tokenizer=tok).eval()
    with torch.no_grad():
        models["dept"].prompt.low_rank.B.normal_(0, 0.1)
    bank.add("dept", models["dept"])
    assert bank["dept"].lead is None  # not cached: the delta counts the row's tokens from its start
    decoder = Decoder(bank, max_rows=4, graphs=False, padded_prefill=True)
    for names in (["dept"], ["dept", "deep", "short", "dept"]):
        texts = [" ".join(["word"] * (1 + 3 * j)) for j in range(len(names))]
        rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=4)) for t, x in zip(names, texts)]
        decoder.run(rows)
        for row, task, text in zip(rows, names, texts):
            assert row.error is None and row.tokens == alone(models[task], {"text": text}, 4, None)[:4], (task, text)


@pytest.mark.parametrize("family", PADDABLE)
def test_a_padded_join_hands_over_what_the_eager_prefill_does(family_models, family):
    """Scores, the attention mask, next positions and the attended keys and values of a
    padded join equal the unpadded prefill's (the pad columns and rows it added are gone)."""
    bank, models, tok = bank_of(family_models, family)
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=1))
            for t, x in [("deep", "a b c"), ("short", "one two three four five"), ("mid", "x")]]
    eager = Prefill(bank)(rows)
    padded = Prefill(bank, graphs=PrefillGraphs(bank, capture=False))(rows)
    assert padded.keys[0].shape == eager.keys[0].shape  # (3, H_kv, P + S, D_head)
    assert padded.prefix_length == eager.prefix_length == 6 and padded.prefixes() == eager.prefixes()
    torch.testing.assert_close(padded.scores, eager.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded.mask, eager.mask) and torch.equal(padded.positions, eager.positions)
    attended = eager.mask.bool()[:, None, :, None]
    for a, b in zip(padded.keys + padded.values, eager.keys + eager.values):
        torch.testing.assert_close(a * attended, b * attended, rtol=1e-4, atol=1e-4)


def test_a_sliding_window_family_is_not_padded(family_models):
    """Mistral's window is not in the 4-D mask the padded forward builds: by default its
    joins are not padded, and asking for it is refused."""
    bank, models, tok = bank_of(family_models, "mistral")
    assert Decoder(bank, graphs=False).prefill.graphs is None
    with pytest.raises(ConfigError, match="cannot be padded"):
        Decoder(bank, graphs=False, padded_prefill=True)


def test_padded_joins_run_the_compiled_prefill_where_the_decoder_compiles(family_models):
    """With compiling on, the padded forward (what a graph records) is the prefill's
    compiled one (dynamic shapes: every bucket shares its versions): rows == alone."""
    from softprompt.serve.prefill import prefill_forward
    from test_serve_slots import compiled_graphs

    torch._dynamo.reset()
    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=3, graphs=False, compile=True, padded_prefill=True)
    assert decoder.prefill.graphs.forward is decoder.prefill._forward
    for i, names in enumerate([["deep"], ["short", "mid", "deep"], ["mid", "short"]]):
        text = " ".join(["word"] * (3 + 7 * i))
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=3)) for t in names]
        decoder.run(rows)
        for row, task in zip(rows, names):
            assert row.tokens == alone(models[task], {"text": text}, 3, None)[:3], (task, text)
    assert decoder.prefill.compiled and compiled_graphs(prefill_forward) >= 1


# -- head requests ------------------------------------------------------------------------
HEAD_TASKS = {  # every method; the classifiers read the last layer, the verbalizer the answer slot at the end
    "sentiment": (lambda: sp.PTuningV2Config(num_virtual_tokens=4, template="{text}", init_std=0.5),
                  lambda: SequenceClassification(["neg", "pos"], pool="last")),
    "topic": (lambda: sp.PromptTuningConfig(template="[P:3] Topic: {text}", init="vocab"),
              lambda: SequenceClassification(["film", "food", "place"], pool="mean")),
    "ner": (lambda: sp.PrefixTuningConfig(num_virtual_tokens=2, template="{tokens}", projection_hidden_size=16),
            lambda: TokenClassification(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])),
    "review": (lambda: sp.PTuningConfig(template="[P:2] {text} [P:2] It was [MASK]", encoder="mlp",
                                        encoder_hidden_size=16),
               lambda: Verbalizer({"neg": ["bad", "awful"], "pos": ["good"]})),
    "mid": (lambda: sp.PromptTuningConfig(template="[P:2] {text} It was [MASK] .", init="vocab"),  # ends at [MASK]
            lambda: Verbalizer({"neg": ["bad"], "pos": ["good"]})),
    "dept": (lambda: sp.DePTConfig(template="[P:2] Review: {text} [MASK]", rank=2, max_input_length=5),
             lambda: Verbalizer({"neg": ["bad"], "pos": ["good"]})),
}
HEAD_REQUESTS = [("sentiment", "a gem of a film"), ("ner", ["Anna", "lives", "in", "Sarajevo"]),
                 ("review", "bad"), ("topic", "the plot wanders but the cast holds it together"),
                 ("review", "the cast holds it together"), ("sentiment", "fine"), ("ner", ["Maria"]),
                 ("topic", "x"), ("mid", "a gem"), ("dept", "the cast holds it together"), ("dept", "x")]


def head_bank(family_models, family, cache_prompts=True):
    base, tok = family_models(family)
    bank = PromptBank(base, tok, cache_prompts=cache_prompts)
    for i, (name, (config, make_task)) in enumerate(HEAD_TASKS.items()):
        torch.manual_seed(i)
        model = sp.SoftPromptModel(base, config(), tokenizer=tok).eval()
        if name == "dept":  # B starts at 0: set it as training would, so that the delta acts
            with torch.no_grad():
                model.prompt.low_rank.B.normal_(0, 0.1)
        task = make_task()
        task.bind(model)
        task.eval()
        bank.add(name, model, task=task)
    return bank


def head_request(task, text):
    return Request(task, {"tokens": text} if isinstance(text, list) else {"text": text})


@pytest.mark.parametrize("family", PADDABLE)
@pytest.mark.parametrize("cache_prompts", [True, False])
def test_padded_head_batches_give_what_the_eager_forward_gives(family_models, family, cache_prompts):
    """Batches of 1, 3 and 5 head requests (padded to 1, 4 and 8 rows, 16 or 32 columns;
    every method, prompt K/V cached or recomputed): the last layer's states of the real
    tokens, the answer slot's scores and the aligned masks equal `forward_mixed`'s."""
    bank = head_bank(family_models, family, cache_prompts)
    graphs = HeadGraphs(bank, capture=False)
    picks = [["review"], ["sentiment", "review", "topic"], ["ner", "review", "sentiment", "topic", "review"],
             ["dept"], ["dept", "sentiment", "dept", "review", "ner"]]  # DePT: its delta padded with its rows
    for names in picks:
        texts = [[t for n, t in HEAD_REQUESTS if n == name][i % 2] for i, name in enumerate(names)]
        examples = [{"tokens": t} if isinstance(t, list) else {"text": t} for t in texts]
        batch = encode_mixed(bank, names, examples)
        for logits in ("answer", "none"):
            assert graphs.takes(batch, logits=logits, output_hidden_states=True)
            padded = graphs(batch, logits=logits, output_hidden_states=True)
            eager = forward_mixed(bank, batch, logits=logits, output_hidden_states=True)
            for key in ("attention_mask", "field_index", "word_index"):
                assert torch.equal(getattr(padded, key), getattr(eager, key)), key
            real = eager.attention_mask.bool()
            torch.testing.assert_close(padded.last_hidden_state[real], eager.last_hidden_state[real], rtol=1e-4,
                                       atol=1e-4)
            if logits == "answer":  # the rows with an answer slot (the verbalizer's)
                answers = batch["answer_index"] >= 0
                assert answers.any()
                torch.testing.assert_close(padded.answer_logits[answers], eager.answer_logits[answers], rtol=1e-4,
                                           atol=1e-4)
            else:
                assert padded.answer_logits is None


def test_head_batches_the_graphs_do_not_take(family_models):
    """An answer slot before the end of a row (right padding), every logit, or a batch
    beyond the token budget run the eager forward."""
    bank = head_bank(family_models, "llama")
    graphs = HeadGraphs(bank, capture=False, max_tokens=64)
    batch = encode_mixed(bank, ["review", "mid"], [{"text": "a gem"}, {"text": "bad"}])
    assert graphs.takes(batch, logits="answer")  # a causal LM's row ends at its answer slot (" ." is not encoded)
    review = encode_mixed(bank, ["review"], [{"text": "a gem"}])
    assert graphs.takes(review, logits="answer") and not graphs.takes(review, logits="all")
    right = encode_mixed(bank, ["review"], [{"text": "a gem"}], padding_side="right")
    assert graphs.takes(right, logits="none")  # one row: no padding at all
    two = encode_mixed(bank, ["review", "review"], [{"text": "a gem"}, {"text": "a b c d e f g h"}],
                       padding_side="right")
    assert not graphs.takes(two, logits="answer")  # the shorter row's answer is not at the end
    long = encode_mixed(bank, ["review"] * 5, [{"text": "a gem"}] * 5)
    assert not graphs.takes(long, logits="answer")  # 8 rows x 16 columns > 64 tokens


@pytest.mark.parametrize("family", PADDABLE)
def test_engine_head_requests_through_the_padded_forward_equal_each_task_alone(family_models, family, monkeypatch):
    """The engine's head batches (classifiers, a tagger, verbalizers, one answering before
    its end) with `head_graphs=True`: each answer equals the task run alone, and every
    batch the graphs take went through them."""
    bank = head_bank(family_models, family)
    calls, finished = [], []
    launch, finish = HeadGraphs.launch, HeadGraphs.finish
    monkeypatch.setattr(HeadGraphs, "launch", lambda self, batch, **kw: calls.append(kw) or launch(self, batch, **kw))
    monkeypatch.setattr(HeadGraphs, "finish", lambda self, batch, launched: finished.append(1) or finish(self, batch, launched))
    engine = Engine(bank, max_batch_rows=4, head_graphs=True)
    requests = [head_request(t, x) for t, x in HEAD_REQUESTS]
    results = engine.run(requests)
    assert all(r.ok for r in results), [r.error for r in results]
    for request, result in zip(requests, results):
        entry = bank[request.task]
        batch, _ = entry.task.collate(entry.model, [request.input], with_targets=False)
        with torch.no_grad():
            expected = entry.task.predict(entry.model, batch)[0]
        if request.task == "ner":
            assert result.output == expected
        else:
            assert result.output["label"] == expected["label"], request
            for label, score in expected["scores"].items():
                assert result.output["scores"][label] == pytest.approx(score, abs=1e-4)
    assert calls, "no head batch went through the padded forward"
    assert len(finished) == len(calls)  # every launched batch read


def test_engine_head_graphs_default_and_refusal(family_models):
    """Off by default on the CPU; asked for on a family whose rows cannot be padded: refused."""
    assert Engine(head_bank(family_models, "llama")).heads.graphs is None
    base, tok = family_models("mistral")
    with pytest.raises(ConfigError, match="cannot be padded"):
        Engine(PromptBank(base, tok), head_graphs=True)
