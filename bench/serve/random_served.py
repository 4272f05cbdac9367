"""A random-init base model of a real shape, saved as a model folder, and prompt folders of
three tasks on it: what `softprompt serve` loads for the HTTP benchmark on a GPU machine
that has no trained weights (speed does not depend on the weights).

    python -m bench.serve.random_served --shape llama-1b --out /tmp/served
    python -m bench.serve.http --model /tmp/served/model --prompts /tmp/served/prompts --dtype bfloat16

Tasks: ``sentiment`` (P-tuning v2, 20 deep tokens, a label-word verbalizer), ``topic``
(prompt tuning, 20 virtual tokens, a classification head on the pooled state), ``ner``
(P-tuning v2, 20 deep tokens, a token-classification head), ``writer`` (P-tuning, MLP
encoder, no head: completions and chat) and ``reader`` (prompt tuning, 20 virtual tokens,
no head: what `bench.serve.scoring` scores against ``topic``'s classification). The tokenizer gets a ChatML chat template (GPT-2's
BPE has none), so that ``/v1/chat/completions`` serves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.harness.shapes import SHAPES, build_base, tokenizer

#: ChatML, as Qwen and SmolLM2-Instruct write their turns
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import softprompt as sp
    from softprompt.tasks import SequenceClassification, TokenClassification, Verbalizer
    from softprompt.folder import save_with_task

    out = Path(args.out)
    tok = tokenizer()
    tok.chat_template = CHATML
    base = build_base(args.shape, "cpu", torch.bfloat16)
    base.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    tasks = {
        "sentiment": (sp.PTuningV2Config(num_virtual_tokens=20, template="{text} It was [MASK] ."),
                      Verbalizer({"negative": "bad", "positive": "good"})),
        "topic": (sp.PromptTuningConfig(template="[P:20] {text} [MASK]", init="random"),
                  SequenceClassification(["world", "sports", "business", "science"])),
        "ner": (sp.PTuningV2Config(num_virtual_tokens=20, template="{tokens}"),
                TokenClassification(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"])),
        "writer": (sp.PTuningConfig(template="[P:4] {text}", encoder="mlp"), None),
        "reader": (sp.PromptTuningConfig(template="[P:20] {text}", init="random"), None),
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
