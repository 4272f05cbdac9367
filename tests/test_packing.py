"""Padding-free packing (`packing.py`, ``train.packing``): a micro-batch's rows packed end to
end give the same loss and the same gradients as the padded batch, for every method on the
causal families and the encoders, with every loss (LM, classification head, verbalizer,
token classification); no segment attends to another; each segment's positions restart;
models that cannot pack are refused (a forward) or train padded (the loop, one log line);
the loop trains and resumes with packing on."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import softprompt as sp
from softprompt import inject, packing
from softprompt.errors import ConfigError, UnsupportedModelError
from softprompt.tasks import Generation, SequenceClassification, TokenClassification, Verbalizer
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

from conftest import make_bert, make_llama

METHODS = {
    "prompt-tuning": lambda t: sp.PromptTuningConfig(template="[P:3] " + t, init="random"),
    "p-tuning-lstm": lambda t: sp.PTuningConfig(template="[P:2] " + t.replace("{text}", "{text} [P:2]"),
                                                encoder="lstm", encoder_hidden_size=16),
    "p-tuning-mlp": lambda t: sp.PTuningConfig(template=t.replace("{text}", "[P:1] {text} [P:2]"), encoder="mlp",
                                               encoder_hidden_size=16),
    "prefix-tuning": lambda t: sp.PrefixTuningConfig(num_virtual_tokens=3, template=t, projection_hidden_size=16),
    "p-tuning-v2": lambda t: sp.PTuningV2Config(num_virtual_tokens=3, template=t, init_std=0.5),
}
PACKED_CAUSAL = ("gpt2", "llama", "qwen2")
PACKED_ENCODERS = ("bert", "roberta")
TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "fine", "not my kind of thing",
         "a tedious , overlong mess that never finds its footing"]
LABELS = ["pos", "neg", "pos", "pos", "neg", "neg"]


def _task(kind: str):
    if kind == "head":
        return SequenceClassification(["neg", "pos"], dropout=0.0), "{text}"
    if kind == "head-first":
        return SequenceClassification(["neg", "pos"], pool="first", dropout=0.0), "{text}"
    if kind == "verbalizer":
        return Verbalizer({"neg": "bad", "pos": "good"}), "{text} It was [MASK]"
    if kind == "verbalizer-words":  # several tokens a word: extra forwards of appended rows
        return Verbalizer({"neg": ["bad", "terrible film"], "pos": ["good", "wonderful film"]}), "{text} It was [MASK]"
    if kind == "lm":
        return Generation(max_new_tokens=4), "{text} ->"
    if kind == "ner":
        return TokenClassification(["O", "B-X", "I-X"], dropout=0.0), "{tokens}"
    raise AssertionError(kind)


def _examples(kind: str):
    if kind == "lm":
        return [{"text": t, "target": l} for t, l in zip(TEXTS, LABELS)]
    if kind == "ner":
        return [{"tokens": t.split(), "tags": ["B-X" if i == 0 else "O" for i in range(len(t.split()))]}
                for t in TEXTS]
    return [{"text": t, "label": l} for t, l in zip(TEXTS, LABELS)]


def _loss_and_grads(model, task, batch, targets):
    model.zero_grad(set_to_none=True)
    task.zero_grad(set_to_none=True)
    loss = task.loss(model, batch, targets)
    loss.backward()
    grads = {f"prompt.{n}": p.grad.clone() for n, p in model.prompt.named_parameters() if p.requires_grad}
    grads |= {f"task.{n}": p.grad.clone() for n, p in task.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(padded, packed):
    (loss, grads), (packed_loss, packed_grads) = padded, packed
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads and grads.keys() == packed_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, name  # a gradient that could differ
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _check(family_models, family, method, kind, budget, device="cpu"):
    base, tok = family_models(family)
    base.to(device)
    task, template = _task(kind)
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, METHODS[method](template), tokenizer=tok)
    task.bind(model)
    model.eval()  # no dropout: the two forwards must see the same network
    batch, targets = task.collate(model, _examples(kind))
    packed = batch.packed(budget)
    assert packed.pack_index.shape[0] < batch.input_ids.shape[0]  # rows really share sequences
    assert (packed.pack_index >= 0).sum() == batch.attention_mask.sum()  # every real token once, no pad
    # cuDNN's LSTM has no backward in eval mode (P-tuning's LSTM encoder); eval mode keeps dropout off
    with torch.backends.cudnn.flags(enabled=device != "cuda"):
        _assert_same(_loss_and_grads(model, task, batch, targets), _loss_and_grads(model, task, packed, targets))


CAUSAL_CASES = [(f, m, k) for f in PACKED_CAUSAL for m in METHODS for k in ("lm", "head", "verbalizer")]
ENCODER_CASES = [(f, m, k) for f in PACKED_ENCODERS for m in METHODS for k in ("head", "head-first", "verbalizer")]


@pytest.mark.parametrize("family,method,kind", CAUSAL_CASES)
def test_packed_causal_loss_and_gradients_equal_the_padded_batch(family_models, family, method, kind):
    _check(family_models, family, method, kind, budget=40)


@pytest.mark.parametrize("family,method,kind", ENCODER_CASES)
def test_packed_encoder_loss_and_gradients_equal_the_padded_batch(family_models, family, method, kind):
    _check(family_models, family, method, kind, budget=40)


DEPT = lambda t: sp.DePTConfig(template="[P:2] " + t, rank=2, max_input_length=6, init="random")  # noqa: E731


@pytest.mark.parametrize("family,kind", [("llama", "head"), ("gpt2", "verbalizer"), ("bert", "head"),
                                         ("roberta", "verbalizer")])
def test_dept_packs_with_each_segment_counting_its_own_tokens(family_models, family, kind):
    """DePT's delta goes to a row's j-th real token (`inject.add_input_delta`): packed, j
    counts within the row's own segment, not along the packed sequence (S_max 6 < the
    rows' lengths, so a count along the sequence would move every later segment's delta).
    Same loss and gradients (P, A, B) as the padded batch; DePT's B starts at zero, so it is
    set to random values first."""
    base, tok = family_models(family)
    task, template = _task(kind)
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, DEPT(template), tokenizer=tok)
    with torch.no_grad():
        for name, p in model.prompt.named_parameters():
            if name.endswith("B"):
                p.normal_(0, 0.5)
    task.bind(model)
    model.eval()
    batch, targets = task.collate(model, _examples(kind))
    packed = batch.packed(40)
    assert packed.pack_index.shape[0] < batch.input_ids.shape[0]
    _assert_same(_loss_and_grads(model, task, batch, targets), _loss_and_grads(model, task, packed, targets))


@pytest.mark.parametrize("family,method,kind", [("llama", "p-tuning-v2", "verbalizer-words"),
                                                ("gpt2", "prompt-tuning", "verbalizer-words"),
                                                ("bert", "p-tuning-v2", "ner"), ("llama", "prompt-tuning", "ner"),
                                                ("llama", "p-tuning-v2", "lm"), ("bert", "prompt-tuning", "head")])
def test_more_losses_and_one_sequence_for_the_whole_batch(family_models, family, method, kind):
    _check(family_models, family, method, kind, budget=4096)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.parametrize("family,method,kind", [(f, m, k) for f in ("llama", "gpt2", "bert") for m in METHODS
                                                for k in (("lm", "verbalizer") if f != "bert" else ("head", "verbalizer"))])
def test_packed_loss_and_gradients_equal_the_padded_batch_on_a_gpu(family_models, family, method, kind):
    """The same on a CUDA device (SDPA's kernels there, the training backends of `attention.py`)."""
    _check(family_models, family, method, kind, budget=40, device="cuda")


@pytest.mark.parametrize("family,method,kind", [("llama", "p-tuning-v2", "lm"), ("bert", "prompt-tuning", "head")])
@pytest.mark.parametrize("option", ["checkpointing", "compile"])
def test_training_views_pack_too(family_models, family, method, kind, option):
    """The base's checkpointed or compiled blocks (``train.gradient_checkpointing``,
    ``train.compile``; aot_eager here, as tests/test_regions.py) read the same packed mask,
    positions and read-only prefix: the padded batch's loss and gradients."""
    base, tok = family_models(family)
    for module in base.modules():  # the view runs training forwards: no dropout, the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    task, template = _task(kind)
    model = sp.SoftPromptModel(base, METHODS[method](template), tokenizer=tok).eval()
    task.bind(model)
    batch, targets = task.collate(model, _examples(kind))
    padded = _loss_and_grads(model, task, batch, targets)
    options = dict(checkpointing=True) if option == "checkpointing" else dict(
        compile=True, compile_options={"backend": "aot_eager"})
    with model.accelerated(**options):
        model.train()
        assert model._running_base() is not model.base
        _assert_same(padded, _loss_and_grads(model, task, batch.packed(40), targets))


def test_flex_attention_packs_with_a_block_mask(family_models):
    """flex_attention takes the same mask functions as a BlockMask: blocks no segment attends
    to are skipped, not computed and masked."""
    base, tok = family_models("llama")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # flex's CUDA kernels need heads of at least 16 dimensions (the tiny Llama's are 8)
        base = make_llama(tok, hidden_size=64)
    base.to(device)
    base.set_attn_implementation("flex_attention")
    task, template = _task("lm")
    model = sp.SoftPromptModel(base, METHODS["p-tuning-v2"](template), tokenizer=tok).eval()
    task.bind(model)
    batch, targets = task.collate(model, _examples("lm"))
    packed = batch.packed(4096)
    inputs = packing.packed_inputs(base, model.spec, batch.input_ids, batch.attention_mask, batch.prompt_index,
                                   model.prompts(), packed.pack_index)
    assert type(inputs["attention_mask"]).__name__ == "BlockMask"
    if device == "cpu":  # flex_attention has no backward on the CPU: the loss alone here
        with torch.no_grad():
            torch.testing.assert_close(task.loss(model, packed, targets), task.loss(model, batch, targets),
                                       rtol=1e-5, atol=1e-6)
        return
    _assert_same(_loss_and_grads(model, task, batch, targets), _loss_and_grads(model, task, packed, targets))


def test_eager_attention_packs_too(family_models):
    base, tok = family_models("llama")
    base.set_attn_implementation("eager")
    task, template = _task("head")
    model = sp.SoftPromptModel(base, METHODS["p-tuning-v2"](template), tokenizer=tok).eval()
    task.bind(model)
    batch, targets = task.collate(model, _examples("head"))
    _assert_same(_loss_and_grads(model, task, batch, targets), _loss_and_grads(model, task, batch.packed(40), targets))


@pytest.mark.parametrize("family,method", [("llama", "p-tuning-v2"), ("gpt2", "prompt-tuning"),
                                           ("bert", "prefix-tuning"), ("roberta", "p-tuning-lstm")])
def test_no_segment_attends_to_another(family_models, family, method):
    base, tok = family_models(family)
    model = sp.SoftPromptModel(base, METHODS[method]("{text}"), tokenizer=tok).eval()
    texts = ["one two three", "four five", "six seven eight nine"]
    batch = model.encode([{"text": t} for t in texts])
    index = batch.packed(4096).pack_index
    assert index.shape[0] == 1  # all three rows in one sequence
    changed = model.encode([{"text": t} for t in texts[:1] + ["ten eleven", texts[2]]])  # row 1 replaced
    assert torch.equal(changed.attention_mask, batch.attention_mask)  # same lengths: same packed layout
    with torch.no_grad():
        before = model(**batch.packed(4096), output_hidden_states=True)
        after = model(**changed.packed(4096), output_hidden_states=True)
    for row in (0, 2):  # the other segments' outputs are the same
        torch.testing.assert_close(after.last_hidden_state[row], before.last_hidden_state[row], rtol=0, atol=1e-6)
    assert not torch.allclose(after.last_hidden_state[1], before.last_hidden_state[1])
    # the packed states are the padded ones
    with torch.no_grad():
        padded = model(**batch, output_hidden_states=True)
    real = padded.attention_mask.bool()
    torch.testing.assert_close(before.last_hidden_state[real], padded.last_hidden_state[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,method,first", [("llama", "prompt-tuning", 0), ("llama", "p-tuning-v2", 3),
                                                 ("gpt2", "prefix-tuning", 3), ("roberta", "prompt-tuning", 2),
                                                 ("roberta", "p-tuning-v2", 5)])
def test_positions_restart_at_each_segment(family_models, family, method, first):
    """Each segment counts from the deep prefix's P (or 0: input prompts are in the row), plus
    the family's offset (RoBERTa: 2), as its padded row."""
    base, tok = family_models(family)
    model = sp.SoftPromptModel(base, METHODS[method]("{text}"), tokenizer=tok)
    batch = model.encode([{"text": "one two three"}, {"text": "four"}, {"text": "five six"}])
    index = batch.packed(4096).pack_index
    inputs = packing.packed_inputs(base, model.spec, batch.input_ids, batch.attention_mask, batch.prompt_index,
                                   model.prompts(), index)
    lengths = batch.attention_mask.sum(1).tolist()
    expected = [first + i for n in lengths for i in range(n)]  # rows in order (the packer keeps row order in a bin)
    assert inputs["position_ids"][0].tolist() == expected
    mask = inputs["attention_mask"]  # (1, 1, W, P + W) boolean
    P = model.prompts().prefix_length
    assert mask.shape == (1, 1, sum(lengths), P + sum(lengths)) and mask.dtype == torch.bool
    assert mask[0, 0, :, :P].all()  # every segment sees the prefix
    if P:  # stored once: the packed sequences' prefix keys are views of the one prefix
        several = batch.packed(1).pack_index  # sequences of the longest row's width: several
        alone = packing.packed_inputs(base, model.spec, batch.input_ids, batch.attention_mask, batch.prompt_index,
                                      model.prompts(), several)
        keys = alone[inject.CACHE_ARG].layers[0].keys  # (N, H_kv, P, D_head)
        assert keys.shape[0] == several.shape[0] > 1 and keys.stride(0) == 0
    assert not mask[0, 0, lengths[0]:, P:P + lengths[0]].any()  # no later segment sees the first


def test_pack_rows_is_first_fit_decreasing_and_keeps_the_budget():
    lengths = [5, 9, 3, 7, 2, 8, 12]
    bins = packing.pack_rows(lengths, 12)
    assert bins == [[6], [1, 2], [4, 5], [0, 3]]  # longest first, each into the first sequence with room
    assert bins == packing.pack_rows(lengths, 12)  # a pure function of its arguments
    assert packing.pack_rows([30, 2], 10) == [[0], [1]]  # an over-long row alone
    assert packing.pack_rows([30, 9, 8, 7], 10) == [[0], [1, 2, 3]]  # the others fill up to its width
    with pytest.raises(ConfigError, match="train.pack_tokens"):
        packing.pack_rows([1], 0)


def test_left_and_right_padding_give_the_same_packing(family_models):
    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, METHODS["prompt-tuning"]("{text}"), tokenizer=tok)
    examples = [{"text": t} for t in TEXTS]
    left, right = model.encode(examples, padding_side="left"), model.encode(examples, padding_side="right")
    pl, pr = left.packed(30), right.packed(30)
    ids = lambda b: packing.gather_columns(b.input_ids, b.pack_index, -1)  # noqa: E731
    assert torch.equal(ids(pl), ids(pr))


@pytest.mark.parametrize("family", ["t5", "bart", "mistral"])
def test_models_that_cannot_pack_are_refused(family_models, family):
    base, tok = family_models(family)
    model = sp.SoftPromptModel(base, METHODS["p-tuning-v2"]("{text}"), tokenizer=tok)
    batch = model.encode([{"text": "one two"}, {"text": "three"}])
    with pytest.raises(UnsupportedModelError, match="cannot pack rows: .*(encoder-decoder|sliding-window)"):
        model(**batch.packed(64), output_hidden_states=True)


def test_an_attention_without_4d_masks_is_refused(family_models):
    base, tok = family_models("llama")
    base.config._attn_implementation = "flash_attention_2"  # its mask is the 2-D padding mask alone
    model = sp.SoftPromptModel(base, METHODS["prompt-tuning"]("{text}"), tokenizer=tok)
    assert "does not take a 4-D mask" in packing.refusal(base, model.spec)


DATA = [{"text": t, "label": l} for t, l in zip(TEXTS * 2, LABELS * 2)]


def _setup(tok, factory=make_bert):
    base = factory(tok)
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4), tokenizer=tok)
    return model, SequenceClassification(["neg", "pos"], pool="mean", dropout=0.1)


def _config(**kwargs):
    return TrainConfig(**(dict(steps=12, batch_size=6, lr=1e-1, head_lr=1e-1, eval_every=4, progress=False, seed=0,
                               packing=True, pack_tokens=24) | kwargs))


def _weights(model, task):
    return {**{f"p.{k}": v.clone() for k, v in model.prompt.state_dict().items()},
            **{f"t.{k}": v.clone() for k, v in task.state_dict().items()}}


class Crash(Exception):
    pass


def test_training_with_packing_trains_and_resumes(wordpiece_tokenizer, tmp_path, monkeypatch):
    seen = []
    original = SequenceClassification.loss

    def recording(self, model, batch, targets):
        seen.append(batch.pack_index is not None)
        return original(self, model, batch, targets)

    monkeypatch.setattr(SequenceClassification, "loss", recording)
    model, task = _setup(wordpiece_tokenizer)
    (tmp_path / "full").mkdir()
    train(model, task, DATA, DATA, _config(), tmp_path / "full")
    expected = _weights(model, task)
    assert seen and all(seen)  # every step was packed
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    calls = {"n": 0}

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:  # between the checkpoints of steps 4 and 8
            raise Crash()
        return recording(self, *args)

    monkeypatch.setattr(SequenceClassification, "loss", crashing)
    model, task = _setup(wordpiece_tokenizer)
    (tmp_path / "cut").mkdir()
    with pytest.raises(Crash):
        train(model, task, DATA, DATA, _config(), tmp_path / "cut")
    monkeypatch.setattr(SequenceClassification, "loss", recording)
    model, task = _setup(wordpiece_tokenizer)
    train(model, task, DATA, DATA, _config(), tmp_path / "cut", resume=True)
    got = _weights(model, task)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_packed_training_reaches_the_padded_runs_weights(wordpiece_tokenizer, tmp_path):
    """Same examples per step, same loss and gradients: the same weights after training
    (within float tolerance: the packed forward sums in another order)."""
    runs = []
    for packing_on in (False, True):
        model, task = _setup(wordpiece_tokenizer)
        for module in [*model.modules(), *task.modules()]:  # dropout draws its masks over the layout's shape
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        (tmp_path / str(packing_on)).mkdir()
        train(model, task, DATA, None, _config(packing=packing_on, eval_every=0), tmp_path / str(packing_on))
        runs.append(_weights(model, task))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_model_that_cannot_pack_trains_padded_with_one_log_line(wordpiece_tokenizer, tmp_path, caplog):
    model, task = _setup(wordpiece_tokenizer, make_llama)
    model.base.config._attn_implementation = "flash_attention_2"  # what the loop asks of the model, not run
    from softprompt.training import loop

    with caplog.at_level(logging.WARNING, logger="softprompt.train"):
        collate = loop._collation(model, task, _config())
    lines = [r.getMessage() for r in caplog.records if "train.packing" in r.getMessage()]
    assert len(lines) == 1 and "padded batches" in lines[0]
    task.bind(model)
    batch, _ = collate(DATA[:3])
    assert batch.pack_index is None


def test_bad_pack_tokens_is_named():
    with pytest.raises(ConfigError, match="train.pack_tokens"):
        TrainConfig(pack_tokens=0).validate()
    with pytest.raises(ConfigError, match="train.packing"):
        TrainConfig(packing="yes").validate()


def test_the_trainer_collator_packs_to_the_padded_loss(wordpiece_tokenizer):
    """`transformers.Trainer`'s path (hf_trainer.py): ``ExampleCollator(pack_tokens=...)``
    hands over the packed layout, and the model's loss is the padded batch's."""
    from softprompt.hf_trainer import ExampleCollator, TrainerModel

    model, task = _setup(wordpiece_tokenizer)
    task.dropout.p = 0.0
    trainer_model = TrainerModel(model, task).eval()
    padded, packed = ExampleCollator(model, task)(DATA[:6]), ExampleCollator(model, task, pack_tokens=24)(DATA[:6])
    assert "pack_index" in packed and "pack_index" not in padded
    assert packed["pack_index"].shape[0] < 6
    torch.testing.assert_close(trainer_model(**packed)["loss"], trainer_model(**padded)["loss"], rtol=1e-5, atol=1e-6)
    base = make_llama(wordpiece_tokenizer)
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="cannot pack rows"):
        ExampleCollator(sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4), tokenizer=wordpiece_tokenizer),
                        task, pack_tokens=24)
