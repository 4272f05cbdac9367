"""Train the quickstart's P-tuning v2 prompt on SST-2 under `transformers.Trainer`, then score it
on the dev split and classify new sentences.

    python examples/quickstart_trainer.py [--steps 300] [--output runs/quickstart-trainer]

`TrainerModel` is the SoftPromptModel and its task as the model Trainer expects (only the
prompt and the head have gradients; the base stays frozen); `ExampleCollator` turns example
dicts into its batches. Trainer's saves write our prompt folder in ``<dir>/prompt`` (what
`softprompt eval / predict / serve` load) and only the trainable tensors in
``<dir>/model.safetensors``, which Trainer reads back to resume.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import Trainer, TrainingArguments

import softprompt as sp
from softprompt.data import load_recipe
from softprompt.hf_trainer import ExampleCollator, TrainerModel
from softprompt.tasks import SequenceClassification
from softprompt.training.evaluate import evaluate

REVIEWS = ["a gem of a film , warm and funny", "a dull , lifeless mess"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="alias, local folder or hub id of the frozen base")
    parser.add_argument("--data", default=None, help="the data root (default: $SOFTPROMPT_DATA, else ../shared/data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", default="runs/quickstart-trainer")
    args = parser.parse_args(argv)

    recipe = load_recipe("sst2", args.data)
    train, dev = recipe.examples("train"), recipe.examples("dev")  # {"text": ..., "label": "positive"}
    base, tokenizer = sp.load_base(args.model)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=16), tokenizer=tokenizer)
    task = SequenceClassification(recipe.labels, pool="mean")  # MiniLM's sentence embeddings are mean-pooled

    trainer = Trainer(
        model=TrainerModel(model, task),
        args=TrainingArguments(
            output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=32, learning_rate=1e-2,
            lr_scheduler_type="linear", warmup_steps=int(0.06 * args.steps), save_strategy="no", logging_steps=50, report_to=[],
            remove_unused_columns=False,  # the collator needs the examples' text fields, not model inputs
            seed=0),
        train_dataset=train,
        data_collator=ExampleCollator(model, task),
    )
    trainer.train()
    trainer.save_model(args.output)  # -> <output>/prompt (our folder) and <output>/model.safetensors

    scores, _ = evaluate(model, task, dev)
    print(f"dev accuracy after {args.steps} steps: {scores['accuracy']:.4f} (SST-2 dev, {len(dev)} sentences); "
          f"the prompt is in {args.output}/prompt")
    bank = sp.PromptBank(base, tokenizer)  # the saved folder, as `softprompt serve` loads it
    bank.add("sentiment", Path(args.output) / "prompt")
    for text, answer in zip(REVIEWS, sp.Engine(bank).classify("sentiment", REVIEWS)):
        print(json.dumps({"input": text, "label": answer["label"], "scores": answer["scores"]}))


if __name__ == "__main__":
    main()
