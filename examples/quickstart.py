"""Train a P-tuning v2 prompt (plus a linear head) on SST-2 with the frozen MiniLM, on the CPU,
with the library's own training loop, then classify new sentences with the saved prompt.

    python examples/quickstart.py [--steps 300] [--output runs/quickstart]

`softprompt.train` is `softprompt train` from Python: the same settings (docs/CONFIG.md),
checks, run folder (config, metrics, the best prompt, a checkpoint to resume from) and the
held-out protocol: the best prompt is selected on 1,000 sentences held out of SST-2's training
split, then scored once on GLUE dev (`metrics.json`: `best`, `test`, `selected_on`,
`reported_on`); `examples/quickstart_trainer.py` trains the same prompt under
`transformers.Trainer` instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import softprompt as sp

REVIEWS = ["a gem of a film , warm and funny", "a dull , lifeless mess"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="alias, local folder or hub id of the frozen base")
    parser.add_argument("--data", default=None, help="the data root (default: $SOFTPROMPT_DATA, else ../shared/data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100, help="0: evaluate only at the end")
    parser.add_argument("--output", default="runs/quickstart")
    args = parser.parse_args(argv)

    result = sp.train(
        model=args.model, method="p-tuning-v2", task="sst2", data_root=args.data, output=args.output,
        num_virtual_tokens=16,
        # MiniLM was trained to give sentence embeddings by mean pooling, so the head reads the
        # mean of the real tokens' states (P-tuning v2's BERT heads read [CLS]: task.pool=first).
        task_options={"pool": "mean"},
        train={"steps": args.steps, "batch_size": 32, "lr": 1e-2, "head_lr": 1e-2, "eval_every": args.eval_every},
        overwrite=True,  # a rerun replaces the last one
    )
    test = result.metrics.get("test", {}).get("accuracy")
    print(f"best dev accuracy {result.best_metric:.4f} at step {result.best_step} of {result.steps} (held-out rows); "
          f"GLUE dev accuracy {test:.4f}; the run is in {args.output}/ (metrics.json, the best prompt/)")

    # Serve the saved prompt as one task of a bank: the engine batches requests of any number
    # of tasks together; its answers name SST-2's labels (negative / positive).
    base, tokenizer = sp.load_base(args.model)
    bank = sp.PromptBank(base, tokenizer)
    bank.add("sentiment", Path(args.output))
    for text, answer in zip(REVIEWS, sp.Engine(bank).classify("sentiment", REVIEWS)):
        print(json.dumps({"input": text, "label": answer["label"], "scores": answer["scores"]}))


if __name__ == "__main__":
    main()
