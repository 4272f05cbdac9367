"""One process of `test_tensor_parallel.py` (run under torchrun, gloo, on the CPU): every
soft-prompt method on a base split by transformers' tensor parallelism (``tp_plan="auto"``)
against the same prompt on the whole base in this process. Rank 0 prints one JSON line:
per method, the largest differences (over both processes) of the logits, the loss and
every trainable parameter's gradient, and whether greedy generation gave the same tokens.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py MODEL_DIR
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import softprompt as sp

METHODS = {
    "prompt-tuning": sp.PromptTuningConfig(template="[P:4] {text}", init="random"),
    "p-tuning": sp.PTuningConfig(template="[P:2] {text} [P:2]", encoder="lstm", encoder_hidden_size=16),
    "prefix-tuning": sp.PrefixTuningConfig(num_virtual_tokens=3, template="{text}", projection_hidden_size=16),
    "p-tuning-v2": sp.PTuningV2Config(num_virtual_tokens=3, template="{text}", init_std=0.5),
}
TEXTS = [{"text": "a gem of a film"}, {"text": "bad"}]


def compare(whole_base, split_base, tok, config) -> dict:
    torch.manual_seed(0)
    whole = sp.SoftPromptModel(whole_base, config, tokenizer=tok)
    split = sp.SoftPromptModel(split_base, config, tokenizer=tok)
    prompt = {n: p.detach() for n, p in whole.named_parameters() if p.requires_grad}
    split.load_state_dict(prompt, strict=False)  # the same prompt on both (the bases are left as loaded)
    results = []
    for model in (whole, split):
        batch = model.encode(TEXTS)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, prompt_index=batch.prompt_index,
                    labels=labels)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            left = model.encode(TEXTS, padding_side="left")
            tokens = model.generate(left.input_ids, left.attention_mask, left.prompt_index, max_new_tokens=5,
                                    do_sample=False)
        results.append((out.logits.detach(), out.loss.detach(), grads, tokens))
    (lw, sw, gw, tw), (ls, ss, gs, ts) = results
    # the largest difference over both processes (each must hold the whole gradient)
    diffs = torch.stack([(lw - ls).abs().max(), (sw - ss).abs(), *((gw[n] - gs[n]).abs().max() for n in gw),
                         torch.tensor(float(not torch.equal(tw, ts)))])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    return {"logits": diffs[0].item(), "loss": diffs[1].item(),
            "grads": {n: d.item() for n, d in zip(gw, diffs[2:-1])},
            "grad_scale": max(g.abs().max().item() for g in gw.values()),
            "same_tokens": diffs[-1].item() == 0, "trainable": sorted(gw)}


def main() -> None:
    folder = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(folder)
    split_base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, tp_plan="auto").eval()
    whole_base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    report = {"tp_size": split_base.tp_size, "methods": {}}
    for name, config in METHODS.items():
        report["methods"][name] = compare(whole_base, split_base, tok, config)
    if dist.get_rank() == 0:
        print(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
