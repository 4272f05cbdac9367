"""`transformers.Trainer` trains a SoftPromptModel unchanged (hf_trainer.py): only the prompt and
the head move, its saves write our prompt folder, and it resumes from its own checkpoint."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import softprompt as sp
from softprompt.hf_trainer import ExampleCollator, TrainerModel
from softprompt.tasks import SequenceClassification
from softprompt.training.evaluate import evaluate

from conftest import make_bert

POSITIVE = ["a gem of a film", "wonderful acting", "great fun", "a delight", "moving and funny", "superb"]
NEGATIVE = ["a dull mess", "terrible plot", "boring", "a waste of time", "awful dialogue", "tedious"]
DATA = [{"text": t, "label": "pos"} for t in POSITIVE] + [{"text": t, "label": "neg"} for t in NEGATIVE]


def _trainer(model, task, out, steps):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.1,
                             save_steps=4, save_strategy="steps", logging_steps=100, report_to=[], use_cpu=True,
                             remove_unused_columns=False, seed=0, dataloader_drop_last=False)
    return Trainer(model=TrainerModel(model, task), args=args, train_dataset=DATA, data_collator=ExampleCollator(model, task))


def test_trainer_trains_the_prompt_and_head_only_and_saves_our_format(wordpiece_tokenizer, tmp_path):
    base = make_bert(wordpiece_tokenizer)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4), tokenizer=wordpiece_tokenizer)
    task = SequenceClassification(["neg", "pos"], pool="mean", dropout=0.0)
    before = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    trainer = _trainer(model, task, tmp_path / "run", steps=12)
    result = trainer.train()
    assert result.training_loss < 0.7  # it learned (chance: ln 2 = 0.69 at the start)
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())  # the base did not move
    assert any(not torch.equal(v, before[k]) for k, v in model.prompt.state_dict().items())
    scores, _ = evaluate(model, task, DATA)
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert saved and all(k.startswith(("model.prompt.", "task.")) for k in saved)  # no base weights
    loaded = sp.SoftPromptModel.from_pretrained(make_bert(wordpiece_tokenizer), tmp_path / "final" / "prompt",
                                                tokenizer=wordpiece_tokenizer)
    from softprompt.folder import load_with_task

    again, task2 = load_with_task(tmp_path / "final" / "prompt", loaded.base, wordpiece_tokenizer)
    assert evaluate(again, task2, DATA)[0]["accuracy"] == scores["accuracy"]
    assert (tmp_path / "run" / "checkpoint-8" / "prompt" / "prompt_config.json").exists()


def test_trainer_resumes_from_its_checkpoint(wordpiece_tokenizer, tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = sp.SoftPromptModel(make_bert(wordpiece_tokenizer), sp.PTuningV2Config(num_virtual_tokens=4),
                                   tokenizer=wordpiece_tokenizer)
        return model, SequenceClassification(["neg", "pos"], pool="mean", dropout=0.0)

    model, task = fresh()
    _trainer(model, task, tmp_path / "whole", steps=8).train()  # writes checkpoint-4 on its way
    resumed, task2 = fresh()
    _trainer(resumed, task2, tmp_path / "again", steps=8).train(
        resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    moved = False
    for k, v in model.prompt.state_dict().items():
        torch.testing.assert_close(resumed.prompt.state_dict()[k], v, rtol=1e-5, atol=1e-6)
        moved |= not torch.equal(v, fresh()[0].prompt.state_dict()[k])
    torch.testing.assert_close(task2.head.weight, task.head.weight, rtol=1e-5, atol=1e-6)
    assert moved
