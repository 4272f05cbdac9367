"""The engine: mixed-task requests give each request the answer its task gives it alone,
and a bad or failing request fails alone, with the status a server returns for it."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.serve import Engine, ErrorKind, PromptBank, Request
from softprompt.tasks import Generation, SequenceClassification, TokenClassification, Verbalizer

from conftest import make_bert, make_llama

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "Anna lives in Sarajevo"]


def alone(model, task, example):
    batch, _ = task.collate(model, [example], with_targets=False)
    with torch.no_grad():
        return task.predict(model, batch)[0]


@pytest.fixture
def encoder_bank(wordpiece_tokenizer):
    """Three tasks with heads on one tiny BERT: two classifiers (deep and input prompts,
    different templates) and a tagger."""
    tok = wordpiece_tokenizer
    base = make_bert(tok).bert.eval()
    bank = PromptBank(base, tok)
    specs = {
        "sentiment": (sp.PTuningV2Config(num_virtual_tokens=4, template="{text}", init_std=0.5),
                      SequenceClassification(["neg", "pos"])),
        "topic": (sp.PromptTuningConfig(template="[P:3] Topic: {text}", init="vocab"),
                  SequenceClassification(["film", "food", "place"], pool="first")),
        "ner": (sp.PrefixTuningConfig(num_virtual_tokens=2, template="{tokens}", projection_hidden_size=16),
                TokenClassification(TAGS)),
    }
    for i, (name, (config, task)) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = sp.SoftPromptModel(base, config, tokenizer=tok).eval()
        task.bind(model)
        task.eval()
        bank.add(name, model, task=task)
    return bank


def test_mixed_head_requests_equal_each_task_alone(encoder_bank):
    bank = encoder_bank
    requests = [Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3]), Request("topic", TEXTS[1]),
                Request("sentiment", {"text": TEXTS[2]}), Request("ner", {"tokens": ["Anna", "Maria"]}),
                Request("topic", TEXTS[2])]
    engine = Engine(bank, max_batch_rows=4)
    results = engine.run(requests)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [kind for kind, _ in engine.batches] == ["forward", "forward"] and sum(n for _, n in engine.batches) == 6
    for request, result in zip(requests, results):
        entry = bank[request.task]
        example = Engine._example(entry, request.input)
        expected = alone(entry.model, entry.task, example)
        if request.task == "ner":
            assert result.output == expected and len(expected) == len(example["tokens"])
        else:
            assert result.output["label"] == expected["label"]
            for label, score in expected["scores"].items():
                assert result.output["scores"][label] == pytest.approx(score, abs=1e-5)
    assert engine.classify("topic", [TEXTS[1]]) == [results[2].output]


def test_the_first_head_batch_runs_before_the_last_request_is_prepared(encoder_bank, monkeypatch):
    """Head rows are cut into batches as they are prepared: the first batch's forward is
    queued while the host still prepares the later requests (S2 on a GPU: the host's
    preparation no longer comes before all the GPU's work); the answers are the batches'
    as before, and generating requests among them still decode."""
    events = []
    prepare, launch = Engine._prepare, Engine._launch_heads
    monkeypatch.setattr(Engine, "_prepare", lambda self, i, r: events.append(("prepare", i)) or prepare(self, i, r))
    monkeypatch.setattr(Engine, "_launch_heads",
                        lambda self, batch: events.append(("launch", [r.index for r in batch])) or launch(self, batch))
    requests = [Request("sentiment" if i % 2 else "topic", TEXTS[i % 3]) for i in range(6)]
    engine = Engine(encoder_bank, max_batch_rows=2)
    results = engine.run(requests)
    assert all(r.ok for r in results), [r.error for r in results]
    assert events.index(("launch", [0, 1])) < events.index(("prepare", 5))
    assert [e for e in events if e[0] == "launch"] == [("launch", [0, 1]), ("launch", [2, 3]), ("launch", [4, 5])]
    for got, one_batch in zip(results, Engine(encoder_bank, max_batch_rows=6).run(requests)):
        assert got.output["label"] == one_batch.output["label"]
        assert got.output["scores"] == pytest.approx(one_batch.output["scores"], abs=1e-5)


def test_bad_requests_fail_alone_with_their_status(encoder_bank):
    engine = Engine(encoder_bank, max_length=12)
    long_text = " ".join(["word"] * 40)
    results = engine.run([Request("sentiment", TEXTS[0]), Request("nope", "x"), Request("sentiment", {"txt": "x"}),
                          Request("sentiment", long_text), Request("sentiment", 3), Request("topic", TEXTS[1])])
    assert [r.error_kind for r in results] == [None, ErrorKind.UNKNOWN_TASK, ErrorKind.BAD_INPUT,
                                               ErrorKind.INPUT_TOO_LONG, ErrorKind.BAD_INPUT, None]
    assert "unknown task 'nope'; loaded tasks: ner, sentiment, topic" in results[1].error
    assert "'text'" in results[2].error and "over the limit of 12" in results[3].error
    truncating = Engine(encoder_bank, max_length=12, truncate=True)
    assert truncating.run([Request("sentiment", long_text)])[0].ok
    with pytest.raises(sp.SoftPromptError, match="unknown task"):
        engine.classify("nope", ["x"])


class Fragile(SequenceClassification):
    """A head that fails on one input: the batch it is in must not fail with it."""

    def predict(self, model, batch, out=None):
        if any(self.poison in row for row in batch["input_ids"].tolist()):
            raise RuntimeError("boom")
        return super().predict(model, batch, out)


def test_a_request_failing_inside_the_model_fails_alone(encoder_bank):
    bank = encoder_bank
    tok = bank.tokenizer
    fragile = Fragile(["neg", "pos"])
    fragile.poison = tok.convert_tokens_to_ids("boring")
    bank.add("fragile", bank["sentiment"].model, task=fragile)
    engine = Engine(bank)
    results = engine.run([Request("fragile", "a gem"), Request("fragile", "boring"), Request("sentiment", "fine"),
                          Request("fragile", "fine")])
    assert [r.error_kind for r in results] == [None, ErrorKind.FAILED, None, None]
    assert "boom" in results[1].error
    assert results[0].output == alone(bank["fragile"].model, fragile, {"text": "a gem"})


def test_causal_verbalizer_and_generation_in_one_run(gpt2_tokenizer):
    tok = gpt2_tokenizer
    base = make_llama(tok).eval()
    bank = PromptBank(base, tok)
    torch.manual_seed(0)
    review = sp.SoftPromptModel(base, sp.PTuningConfig(template="[P:2] {text} [P:2] It was [MASK]", encoder="mlp",
                                                       encoder_hidden_size=16), tokenizer=tok).eval()
    verbalizer = Verbalizer({"neg": ["bad", "awful"], "pos": ["good"]})
    bank.add("review", review, task=verbalizer)
    summary = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="Text: {input} Summary:",
                                                          init_std=0.5), tokenizer=tok).eval()
    generation = Generation(max_new_tokens=5)
    bank.add("summary", summary, task=generation)
    bank.add("free", sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:4] {text}"), tokenizer=tok).eval())
    engine = Engine(bank)
    requests = [Request("review", TEXTS[0]), Request("summary", TEXTS[2]), Request("free", TEXTS[1], generate=True,
                options={"max_new_tokens": 4}), Request("review", TEXTS[1]), Request("summary", TEXTS[1]),
                Request("free", TEXTS[3], generate=True, options={"max_new_tokens": 4})]
    results = engine.run(requests)
    assert all(r.ok for r in results), [r.error for r in results]
    for request, result in zip(requests, results):
        entry = bank[request.task]
        example = Engine._example(entry, request.input)
        if request.task == "free":
            new = entry.model.generate(**entry.model.encode([example]), max_new_tokens=4, do_sample=False)
            assert result.output == tok.decode(new[0].tolist(), skip_special_tokens=True)
            assert result.new_tokens == 4
        elif request.task == "summary":
            assert result.output == alone(entry.model, entry.task, example)
        else:
            expected = alone(entry.model, entry.task, example)
            assert result.output["label"] == expected["label"]
            assert result.output["scores"]["pos"] == pytest.approx(expected["scores"]["pos"], abs=1e-5)
    text = results[2].output
    assert len(text) >= 4
    stop = text[2:4]
    stopped = engine.run([Request("free", TEXTS[1], generate=True, options={"max_new_tokens": 4, "stop": [stop]})])
    assert stopped[0].output == text[: text.index(stop)]
    bad = engine.run([Request("free", "x", generate=True, options={"beams": 3}), Request("free", "x")])
    assert [r.error_kind for r in bad] == [ErrorKind.BAD_INPUT, ErrorKind.BAD_INPUT]
    assert "unknown generation option" in bad[0].error and "no task head" in bad[1].error


def _same_answers(results, expected):
    for result, want in zip(results, expected):
        assert result.ok and want.ok, (result.error, want.error)
        if isinstance(want.output, dict):
            assert result.output["label"] == want.output["label"]
            for label, score in want.output["scores"].items():
                assert result.output["scores"][label] == pytest.approx(score, abs=1e-4)
        else:
            assert result.output == want.output


def test_compiled_head_forwards_answer_as_eager_with_few_compiles(encoder_bank):
    """`Engine(compile=True)`: batches of head requests of any size, length and task mix
    run the base through one compiled forward with dynamic shapes (`serve.compiled`); the
    answers equal the uncompiled engine's, and the versions `warm_up` compiled serve every
    batch."""
    from softprompt.serve.mixed import head_forward
    from softprompt.serve.warmup import warm_up

    from test_serve_slots import compiled_graphs

    torch._dynamo.reset()
    bank = encoder_bank
    eager, compiled = Engine(bank, max_batch_rows=4), Engine(bank, max_batch_rows=4, compile=True)
    assert sorted(warm_up(compiled)) == ["ner", "sentiment", "topic"] and compiled.batches == []
    versions = compiled_graphs(head_forward)
    words = TEXTS[2].split()
    batches = [[Request("topic", TEXTS[1])],
               [Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3]), Request("topic", TEXTS[2])],
               [Request("topic", " ".join(words[:n])) for n in (2, 5, 9)],
               [Request("sentiment", " ".join(words[:n])) for n in (1, 3, 7, 10)],
               [Request("ner", {"tokens": words[:n]}) for n in (4, 6)],
               [Request("sentiment", TEXTS[2]), Request("topic", TEXTS[0])],
               [Request("ner", TEXTS[3])]]
    for requests in batches:
        _same_answers(compiled.run(requests), eager.run(requests))
    assert compiled.heads.forward.compiled
    # one row or more; a prefix cache or none; one task's prefix shared (a stride-0 view) or
    # two tasks' gathered per row: the batches after the warm-up compiled nothing more
    assert compiled_graphs(head_forward) == versions == 5


def test_a_head_forward_that_cannot_be_compiled_runs_uncompiled(encoder_bank, monkeypatch, caplog):
    import torch._dynamo

    def broken(fn, **kwargs):
        def fails(*args, **kw):
            raise torch._dynamo.exc.BackendCompilerFailed(fn, RuntimeError("no compiler here"))
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    requests = [Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3]), Request("topic", TEXTS[1])]
    engine = Engine(encoder_bank, compile=True)
    _same_answers(engine.run(requests), Engine(encoder_bank).run(requests))
    _same_answers(engine.run(requests[:1]), Engine(encoder_bank).run(requests[:1]))
    assert not engine.heads.forward.compiled
    assert sum(r.message.startswith("head forward not compiled") for r in caplog.records) == 1


def test_regionally_compiled_head_forwards_answer_as_eager(encoder_bank):
    """``compile={"regional": True}``: the base's blocks compiled instead of the whole head
    forward (`serve.compiled`, `regions.view`): the answers equal the uncompiled engine's for
    batches of any size, length and task mix; the forward itself is never compiled, one
    block's code is, and the base keeps its own blocks."""
    from softprompt.serve.mixed import head_forward
    from softprompt.serve.warmup import warm_up

    from test_serve_slots import compiled_graphs

    torch._dynamo.reset()
    bank = encoder_bank
    block = type(bank.base.encoder.layer[0])
    eager, compiled = Engine(bank, max_batch_rows=4), Engine(bank, max_batch_rows=4, compile={"regional": True})
    assert sorted(warm_up(compiled)) == ["ner", "sentiment", "topic"]
    words = TEXTS[2].split()
    for requests in ([Request("topic", TEXTS[1])],
                     [Request("sentiment", TEXTS[0]), Request("ner", TEXTS[3]), Request("topic", TEXTS[2])],
                     [Request("sentiment", " ".join(words[:n])) for n in (1, 3, 7, 10)],
                     [Request("ner", {"tokens": words[:n]}) for n in (4, 6)]):
        _same_answers(compiled.run(requests), eager.run(requests))
    assert compiled.heads.forward.compiled
    assert compiled_graphs(head_forward) == 0 and compiled_graphs(block.forward) >= 1
    assert all(type(layer) is block for layer in bank.base.encoder.layer)  # the base is not modified
