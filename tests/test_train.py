"""The training loop: it learns, it writes the run directory, it resumes bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

import softprompt as sp
from softprompt.tasks import SequenceClassification
from softprompt.errors import TrainingError
from softprompt.training.config import TrainConfig
from softprompt.training.evaluate import evaluate
from softprompt.training.loop import train
from softprompt.training.order import epoch_batches

from conftest import make_bert

POSITIVE = ["a gem of a film", "wonderful acting", "great fun", "a delight", "moving and funny", "superb"]
NEGATIVE = ["a dull mess", "terrible plot", "boring", "a waste of time", "awful dialogue", "tedious"]
DATA = [{"text": t, "label": "pos"} for t in POSITIVE] + [{"text": t, "label": "neg"} for t in NEGATIVE]


def setup(tok, method="p-tuning-v2"):
    base = make_bert(tok)
    config = sp.PTuningV2Config(num_virtual_tokens=4) if method == "p-tuning-v2" else sp.PTuningConfig(
        num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16, encoder_dropout=0.1)
    if method == "dept":  # its own optimizer group (train.delta_lr) for the low-rank pair
        config = sp.DePTConfig(num_virtual_tokens=2, rank=2, max_input_length=8)
    torch.manual_seed(0)
    return sp.SoftPromptModel(base, config, tokenizer=tok), SequenceClassification(["neg", "pos"], pool="mean", dropout=0.1)


def small(**kwargs):
    defaults = dict(steps=20, batch_size=4, lr=1e-1, head_lr=1e-1, eval_every=5, progress=False, seed=0)
    return TrainConfig(**(defaults | kwargs))


def test_training_learns_and_writes_the_run_directory(wordpiece_tokenizer, tmp_path):
    model, task = setup(wordpiece_tokenizer)
    result = train(model, task, DATA, DATA, small(steps=40, eval_every=10), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.best_metric == max(r["accuracy"] for r in rows) and result.best_metric >= 0.9
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["best_step"] == result.best_step and summary["steps"] == 40
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (tmp_path / "prompt").iterdir()} >= {"prompt_config.json", "head.safetensors", "task.json"}
    # the saved best prompt + head reproduce the best dev accuracy
    loaded = sp.SoftPromptModel.from_pretrained(model.base, tmp_path / "prompt", tokenizer=wordpiece_tokenizer)
    from softprompt.io.atomic import load_tensors
    from softprompt.tasks import task_from_config

    task2 = task_from_config(json.loads((tmp_path / "prompt" / "task.json").read_text()))
    task2.bind(loaded)
    task2.load_state_dict(load_tensors(tmp_path / "prompt" / "head.safetensors"))
    scores, _ = evaluate(loaded, task2, DATA)
    assert scores["accuracy"] == result.best_metric


def _weights(model, task):
    return {**{f"p.{k}": v.clone() for k, v in model.prompt.state_dict().items()},
            **{f"t.{k}": v.clone() for k, v in task.state_dict().items()}}


def test_same_seed_is_bit_reproducible(wordpiece_tokenizer, tmp_path):
    runs = []
    for name in ("a", "b"):
        model, task = setup(wordpiece_tokenizer, "p-tuning")
        (tmp_path / name).mkdir()
        train(model, task, DATA, DATA, small(), tmp_path / name)
        runs.append(_weights(model, task))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["p-tuning", "dept"])
def test_resume_reaches_the_uninterrupted_weights(wordpiece_tokenizer, tmp_path, monkeypatch, method):
    model, task = setup(wordpiece_tokenizer, method)  # p-tuning: dropout in the prompt encoder and the base
    (tmp_path / "full").mkdir()
    train(model, task, DATA, DATA, small(delta_lr=1e-2), tmp_path / "full")
    expected = _weights(model, task)
    if method == "dept":  # the pair trained (B left zero), at its own rate
        assert expected["p.low_rank.B"].abs().max() > 0

    model, task = setup(wordpiece_tokenizer, method)
    (tmp_path / "cut").mkdir()
    calls = {"n": 0}
    original = SequenceClassification.loss

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == 13:  # mid-way between the checkpoints of steps 10 and 15
            raise Crash()
        return original(self, *args)

    monkeypatch.setattr(SequenceClassification, "loss", crashing)
    with pytest.raises(Crash):
        train(model, task, DATA, DATA, small(delta_lr=1e-2), tmp_path / "cut")
    monkeypatch.setattr(SequenceClassification, "loss", original)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())["step"] == 10

    model, task = setup(wordpiece_tokenizer, method)  # a fresh process would start like this
    train(model, task, DATA, DATA, small(delta_lr=1e-2), tmp_path / "cut", resume=True)
    got = _weights(model, task)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_non_finite_loss_stops_and_keeps_the_last_good_state(wordpiece_tokenizer, tmp_path, monkeypatch):
    model, task = setup(wordpiece_tokenizer)
    original = SequenceClassification.loss
    calls = {"n": 0}

    def exploding(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(SequenceClassification, "loss", exploding)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 7"):
        train(model, task, DATA, DATA, small(), tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 5
    assert "non-finite" in json.loads((tmp_path / "metrics.json").read_text())["stopped"]
    # The loop reads a step's loss one step late; the non-finite step's update was skipped on
    # the device (fused AdamW's found_inf), so the weights in memory never saw its NaN gradients.
    assert all(torch.isfinite(p).all() for p in list(model.prompt.parameters()) + list(task.parameters()))
    assert (tmp_path / "prompt" / "prompt.safetensors").exists()


def test_gradient_accumulation_matches_a_larger_batch(wordpiece_tokenizer, tmp_path):
    results = []
    for name, cfg in (("big", small(batch_size=4, grad_accum=1, steps=3, bucket=False)),
                      ("acc", small(batch_size=2, grad_accum=2, steps=3, bucket=False))):
        model, task = setup(wordpiece_tokenizer)
        for module in [*model.modules(), *task.modules()]:  # no dropout: the same RNG draws in both runs
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        (tmp_path / name).mkdir()
        # same examples per optimiser step: batches of 4 vs two consecutive batches of 2 of the same order
        train(model, task, DATA, None, cfg, tmp_path / name)
        results.append(_weights(model, task))
    # one permutation cut in 4s or in 2s: each optimiser step sees the same four examples
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_epoch_batches_cover_each_example_once_and_bucket_lengths():
    examples = [{"text": "x" * n} for n in range(200)]
    batches = epoch_batches(examples, 8, epoch=3, seed=1, bucket=True)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    spread = sum(max(b) - min(b) for b in batches) / len(batches)
    assert spread < 100  # similar lengths per batch (random batches spread ~170)
    assert batches == epoch_batches(examples, 8, epoch=3, seed=1, bucket=True)
    assert batches != epoch_batches(examples, 8, epoch=4, seed=1, bucket=True)


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "train.steps must be a positive integer"),
    ("schedule", "step", "train.schedule must be one of"),
    ("lr", -1, "train.lr must be positive"),
    ("patience", 0, "train.patience"),
    ("compile", "fast", "train.compile must be auto, true, false or one of"),
    ("gradient_checkpointing", "yes", "train.gradient_checkpointing must be true or false"),
])
def test_bad_train_config(field, value, match):
    with pytest.raises(sp.ConfigError, match=match):
        TrainConfig(**{field: value}).validate()


def test_gradient_checkpointing_trains_to_the_same_weights(wordpiece_tokenizer, tmp_path):
    """train.gradient_checkpointing recomputes each block in the backward pass: same weights
    (P-tuning v2: the deep prefix is kept under recomputation), dropout included."""
    runs = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model, task = setup(wordpiece_tokenizer)
        train(model, task, DATA, None, small(steps=6, gradient_checkpointing=checkpointing), tmp_path / name)
        runs.append(_weights(model, task))
        assert model._train_base is None  # the training view is gone after the run
    plain, checkpointed = runs
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any((plain[k] != 0).any() for k in plain)


def test_training_forwards_on_a_gpu_leave_cudnn_attention_out():
    """cuDNN attention's backward gives NaN for fully masked query rows (left pads); a forward
    that will be differentiated on CUDA runs without it, everything else keeps all backends."""
    from torch.nn.attention import SDPBackend

    from softprompt.attention import training_backends

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert SDPBackend.CUDNN_ATTENTION not in training_backends(cuda)
    assert SDPBackend.EFFICIENT_ATTENTION in training_backends(cuda)
    assert training_backends(cpu) is None
    with torch.no_grad():
        assert training_backends(cuda) is None
