"""Train a P-tuning v2 prompt (plus a linear head) on SST-2 with the frozen MiniLM, on the CPU.

    python examples/quickstart.py [--steps 300] [--data ../shared/data]

Prints dev accuracy before and after training, and saves the prompt to runs/quickstart/.
This uses the core Python API only; `softprompt train` (issue 3) wraps the same steps.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
from pathlib import Path

import torch
from torch import nn

import softprompt as sp
from softprompt.base_models import load_base


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [(row["sentence"], int(row["label"])) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("SOFTPROMPT_DATA", str(here.parent / "shared" / "data")))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", choices=["mean", "cls"], default="mean")
    parser.add_argument("--output", default=str(here / "runs" / "quickstart"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    sst2 = Path(args.data) / "sst2"
    train, dev = read_sst2(sst2 / "train.tsv"), read_sst2(sst2 / "dev.tsv")
    base, tokenizer = load_base("minilm")  # frozen all-MiniLM-L6-v2 encoder
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=args.virtual_tokens), tokenizer=tokenizer)
    # MiniLM was trained to give sentence embeddings by mean pooling, so the head reads the
    # mean of the real tokens' states (P-tuning v2's BERT heads read [CLS]; see --pool).
    head = nn.Linear(model.spec.hidden_size, 2)
    optimizer = torch.optim.AdamW([*model.prompt.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.0)

    def logits_of(pairs):
        batch = model.encode([{"text": text} for text, _ in pairs], max_length=128)
        out = model(**batch)
        if args.pool == "cls":
            return head(out.last_hidden_state[:, 0])
        weights = out.attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, T, 1) real tokens
        return head((out.last_hidden_state * weights).sum(1) / weights.sum(1))

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        correct = 0
        for i in range(0, len(dev), 128):
            chunk = dev[i : i + 128]
            pred = logits_of(chunk).argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
        model.train()
        return correct / len(dev)

    print(f"MiniLM frozen, P-tuning v2 with {args.virtual_tokens} virtual tokens: "
          f"{model.trainable_parameters() + sum(p.numel() for p in head.parameters()):,} trainable parameters "
          f"of {sum(p.numel() for p in base.parameters()):,}")
    print(f"dev accuracy before training: {accuracy():.4f}")
    start = time.time()
    order = list(range(len(train)))
    random.shuffle(order)
    model.train()
    for step in range(1, args.steps + 1):
        idx = order[(step - 1) * args.batch_size % len(order):][: args.batch_size]
        pairs = [train[i] for i in idx]
        loss = nn.functional.cross_entropy(logits_of(pairs), torch.tensor([y for _, y in pairs]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    acc = accuracy()
    print(f"dev accuracy after {args.steps} steps: {acc:.4f}  (SST-2 dev, {len(dev)} sentences, {time.time() - start:.0f}s)")
    model.save_pretrained(args.output, metadata={"task": "sst2", "dev_accuracy": acc, "steps": args.steps})
    print(f"saved the prompt to {args.output}")


if __name__ == "__main__":
    main()
