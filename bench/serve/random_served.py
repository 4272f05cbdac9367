"""A random-init base model of a real shape, saved as a model folder, and prompt folders of
three tasks on it: what `softprompt serve` loads for the HTTP benchmark on a GPU machine
that has no trained weights (speed does not depend on the weights).

    python -m bench.serve.random_served --shape llama-1b --out /tmp/served
    python -m bench.serve.http --model /tmp/served/model --prompts /tmp/served/prompts --dtype bfloat16

Tasks: ``sentiment`` (P-tuning v2, 20 deep tokens, a label-word verbalizer), ``topic``
(prompt tuning, 20 virtual tokens, a classification head on the pooled state) and ``writer``
(P-tuning, MLP encoder, no head: completions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.harness.shapes import SHAPES, build_base, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import softprompt as sp
    from softprompt.tasks import SequenceClassification, Verbalizer
    from softprompt.folder import save_with_task

    out = Path(args.out)
    tok = tokenizer()
    base = build_base(args.shape, "cpu", torch.bfloat16)
    base.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    tasks = {
        "sentiment": (sp.PTuningV2Config(num_virtual_tokens=20, template="{text} It was [MASK] ."),
                      Verbalizer({"negative": "bad", "positive": "good"})),
        "topic": (sp.PromptTuningConfig(template="[P:20] {text} [MASK]", init="random"),
                  SequenceClassification(["world", "sports", "business", "science"])),
        "writer": (sp.PTuningConfig(template="[P:4] {text}", encoder="mlp"), None),
    }
    for name, (config, task) in tasks.items():
        torch.manual_seed(len(name))
        model = sp.SoftPromptModel(base, config, tokenizer=tok)
        if task is None:
            model.save_pretrained(out / "prompts" / name, save_trainable=False)
        else:
            task.bind(model)
            save_with_task(model, task, out / "prompts" / name, {"note": "random init: for speed only"})
    print(f"wrote {out / 'model'} and {len(tasks)} prompt folders under {out / 'prompts'}")


if __name__ == "__main__":
    main()
