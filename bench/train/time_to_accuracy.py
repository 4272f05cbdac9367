"""Time to a fixed SST-2 dev accuracy: `softprompt train` against HF PEFT under `transformers.Trainer`.

    python -m bench.train.time_to_accuracy --out bench/results/train_time_to_accuracy.json          # on a GPU
    python -m bench.train.time_to_accuracy --steps 4 --eval-every 2 --dev-limit 32 --batch-size 4 \\
        --out /tmp/t.json                                                                           # CPU smoke run

Both sides: SmolLM2-135M-Instruct (the packaged real weights, `smollm2-135m`), prompt tuning with
20 virtual tokens in front of the text, a linear classification head over the last token's
state, SST-2 train / dev (../shared/data), the same learning rate, batch size, step budget
and evaluation interval; each side otherwise as its users run it:

  ours   `softprompt.training.run.run_training` (what `softprompt train` runs): its defaults (linear
         decay after 6% warm-up, clipping at 1.0, length-bucketed batches, head lr 5e-3), the
         base as loaded (fp32) with bf16 autocast on a GPU (``--dtype`` changes it), and ``train.compile`` as given (``--compile``).
  peft   `get_peft_model(LlamaForSequenceClassification, PromptTuningConfig(task_type="SEQ_CLS"))`
         under `Trainer` with its defaults (linear decay, no warm-up, AdamW, clipping at 1.0,
         random batches, ``bf16=True`` on a GPU); inputs padded on the left so that the
         classifier reads the last real token.

Reported per side: every evaluation's step, dev accuracy and training seconds so far
(evaluation time excluded), and the training seconds until the dev accuracy first reaches
``--target``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, versions, write_json

P = 20


def ours(args) -> dict:
    from softprompt.training.run import run_training
    from softprompt.training.config import RunConfig
    from softprompt.training.config import TrainConfig

    compile_setting = {"false": False, "true": True}.get(args.compile, args.compile)
    cfg = RunConfig(model="smollm2-135m", method="prompt-tuning", task="sst2", head="linear", data_root=args.data_root,
                    dtype=args.dtype,
                    num_virtual_tokens=P, template=f"[P:{P}] {{text}}",
                    train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      eval_every=args.eval_every, seed=0, progress=False, compile=compile_setting))
    with tempfile.TemporaryDirectory() as out:
        if args.dev_limit:  # the first N dev examples, as a file (the PEFT side takes the same N)
            from softprompt import data as datamod

            dev = datamod.load_recipe("sst2", args.data_root).examples("dev")[: args.dev_limit]
            cfg.eval_file = str(Path(out) / "dev.jsonl")
            Path(cfg.eval_file).write_text("".join(json.dumps(e) + "\n" for e in dev))
            cfg.output = str(Path(out) / "run")
        else:
            cfg.output = out
        start = time.perf_counter()
        run_training(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [{"step": r["step"], "accuracy": r["accuracy"], "train_seconds": round(r["train_seconds"], 2)} for r in rows]
    return {"evals": evals, "wall_seconds": round(wall, 1), "compile": args.compile}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, encoded: list[dict]):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        return self.encoded[i]


def peft_trainer(args) -> dict:
    import numpy as np
    from peft import PromptTuningConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)

    from softprompt import data as datamod
    from softprompt.base_models import load_base

    _, tokenizer = load_base("smollm2-135m")  # converts the packaged GGUF once, into softprompt's cache
    from softprompt.base_models import cache_dir

    folder = cache_dir() / "models" / "smollm2-135m"
    cuda = torch.cuda.is_available()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=2, dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    tokenizer.padding_side = "left"
    recipe = datamod.load_recipe("sst2", args.data_root)
    labels = sorted({str(e["label"]) for e in recipe.examples("train")})

    def encode(examples):
        return [{**tokenizer(e["text"], truncation=True, max_length=256), "labels": labels.index(str(e["label"]))}
                for e in examples]

    train = _Examples(encode(recipe.examples("train")))
    dev_examples = recipe.examples("dev")
    dev = _Examples(encode(dev_examples[: args.dev_limit] if args.dev_limit else dev_examples))
    clock = {"start": None, "eval": 0.0, "last": None, "evals": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            clock["last"] = time.perf_counter()

        def on_evaluate(self, _args, state, _control, metrics=None, **k):
            # training time so far = until the step before this evaluation, minus earlier evaluations
            now = time.perf_counter()
            trained = clock["last"] - clock["start"] - clock["eval"]
            clock["evals"].append({"step": state.global_step, "accuracy": metrics["eval_accuracy"],
                                   "train_seconds": round(trained, 2)})
            clock["eval"] += now - clock["last"]
            clock["last"] = now

    def accuracy(prediction) -> dict:
        logits, gold = prediction
        return {"accuracy": float((np.argmax(logits, -1) == gold).mean())}

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size,
                                     per_device_eval_batch_size=64, learning_rate=args.lr, max_steps=args.steps,
                                     eval_strategy="steps", eval_steps=args.eval_every, save_strategy="no",
                                     logging_steps=args.eval_every, report_to=[], bf16=cuda, seed=0,
                                     use_cpu=not cuda)
        trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=dev,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=[Timer()])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {"evals": clock["evals"], "wall_seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--compile", default="reduce-overhead", help="ours: train.compile (false, true or a mode)")
    parser.add_argument("--dev-limit", type=int, default=0, help="evaluate on the first N dev examples (0: all)")
    parser.add_argument("--sides", default="ours,peft")
    parser.add_argument("--dtype", default="auto", help="ours: the base's dtype (auto: the checkpoint's, with bf16 autocast)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_time_to_accuracy.json")
    args = parser.parse_args()
    report = {"benchmark": "train_time_to_accuracy", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else "CPU", "versions": versions(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "weights": "real (SmolLM2-135M-Instruct, packaged GGUF dequantised)", "sides": {}}
    runners = {"ours": ours, "peft": peft_trainer}
    for side in args.sides.split(","):
        result = runners[side](args)
        reached = next((e for e in result["evals"] if e["accuracy"] >= args.target), None)
        result["seconds_to_target"] = reached and reached["train_seconds"]
        report["sides"][side] = result
        print(side, json.dumps(result)[:400], flush=True)
        write_json(report, args.out)
    sides = report["sides"]
    if all(s in sides and sides[s]["seconds_to_target"] for s in ("ours", "peft")):
        report["speedup_to_target"] = round(sides["peft"]["seconds_to_target"] / sides["ours"]["seconds_to_target"], 2)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
