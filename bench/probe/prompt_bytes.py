"""What a saved prompt costs to store and to serve, per method: softprompt's files against HF
PEFT's adapter, and whether storing the inference tensor in bf16 changes accuracy.

    python -m bench.probe.prompt_bytes --out bench/results/prompt_bytes.json     # CPU, ~5 minutes

Part 1, sizes (randomly initialised bases of real shapes, 20 virtual tokens, the same
method sizes as bench.train.throughput: `bench.harness.steps`): the bytes of ``prompt.safetensors`` (the collapsed
inference tensor, what serving loads: fp32, and in bf16), of ``trainable.safetensors`` (the
training-time module, for resuming), against PEFT's ``adapter_model.safetensors`` after
``save_pretrained``.

Part 2, bf16 storage on a real task: prompts trained on SST-2 with all-MiniLM-L6-v2 (CPU),
evaluated on the dev set with their inference tensor as trained (fp32) and rounded to bf16.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.harness.baselines import run_ours
from bench.harness.report import RESULTS, versions, write_json
from bench.harness.shapes import build_base
from bench.harness.steps import METHODS, our_config, peft_config

MEASURED = ("gpt2-124m", "smollm2-135m", "llama-3b")  # the shapes of prompt_bytes.json (harness.shapes)

def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def sizes(shape: str) -> list[dict]:
    from peft import get_peft_model
    from safetensors.torch import save_file

    import softprompt as sp

    base = build_base(shape, "cpu", torch.bfloat16)
    hidden = base.config.hidden_size
    rows = []
    for method in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = sp.SoftPromptModel(base, our_config(method, hidden))
            model.save_pretrained(tmp / "ours")
            tensor = model.export()
            save_file({"prompt": tensor.bfloat16().contiguous()}, str(tmp / "bf16.safetensors"))
            peft_model = get_peft_model(base, peft_config(method))
            peft_model.save_pretrained(str(tmp / "peft"))
            base.requires_grad_(False)
            rows.append({
                "shape": shape, "method": method, "inference_tensor_shape": list(tensor.shape),
                "ours_prompt_fp32_bytes": _size(tmp / "ours" / "prompt.safetensors"),
                "ours_prompt_bf16_bytes": _size(tmp / "bf16.safetensors"),
                "ours_trainable_bytes": _size(tmp / "ours" / "trainable.safetensors"),
                "peft_adapter_bytes": _size(tmp / "peft" / "adapter_model.safetensors"),
            })
            print(rows[-1], flush=True)
    return rows


def bf16_accuracy(method: str, steps: int, data_root: str | None) -> dict:
    from softprompt.io.atomic import load_tensors
    from softprompt.folder import load_with_task
    from softprompt.base_models import load_base
    from softprompt.training.config import RunConfig
    from softprompt.training.config import TrainConfig
    from softprompt.training.evaluate import evaluate
    from softprompt import data as datamod
    from safetensors.torch import save_file

    deep = method in ("prefix-tuning", "p-tuning-v2")
    lr = {"prompt-tuning": 3e-2, "p-tuning-v2": 1e-2}[method]
    cfg = RunConfig(model="minilm", method=method, task="sst2", head="linear", data_root=data_root,
                    num_virtual_tokens=20, template=None if deep else "[P:20] {text}",
                    train=TrainConfig(steps=steps, batch_size=32, lr=lr, head_lr=5e-3, eval_every=steps,
                                      seed=0, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(tmp) / "fp32"
        trained = run_ours(cfg, keep=str(kept))
        rounded = Path(tmp) / "bf16"
        shutil.copytree(kept, rounded)
        tensor = load_tensors(kept / "prompt.safetensors")["prompt"]
        save_file({"prompt": tensor.bfloat16().float()}, str(rounded / "prompt.safetensors"))
        (rounded / "trainable.safetensors").unlink(missing_ok=True)  # inference reads the collapsed tensor
        (kept / "trainable.safetensors").unlink(missing_ok=True)
        base, tokenizer = load_base("minilm")
        dev = datamod.load_recipe("sst2", data_root).examples("dev")
        out = {"method": method, "steps": steps, "train_best_dev": trained["best_dev"],
               "max_abs_rounding": float((tensor.bfloat16().float() - tensor).abs().max())}
        predictions = {}
        for name, folder in (("fp32", kept), ("bf16", rounded)):
            model, task = load_with_task(folder, base, tokenizer)
            scores, preds = evaluate(model, task, dev, 64)
            out[f"dev_accuracy_{name}"] = scores["accuracy"]
            predictions[name] = [p["label"] for p in preds]
        out["dev_examples"] = len(dev)
        out["predictions_changed"] = sum(a != b for a, b in zip(predictions["fp32"], predictions["bf16"]))
    print(out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(MEASURED))
    parser.add_argument("--methods", default="prompt-tuning,p-tuning-v2", help="part 2 methods")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "prompt_bytes.json")
    args = parser.parse_args()
    report = {"benchmark": "prompt_bytes", "versions": versions(), "rerun": "python -m bench.probe.prompt_bytes",
              "sizes": [], "bf16_storage": []}
    for shape in args.shapes.split(","):
        report["sizes"] += sizes(shape)
        write_json(report, args.out)
    for method in args.methods.split(","):
        report["bf16_storage"].append(bf16_accuracy(method, args.steps, args.data_root))
        write_json(report, args.out)
    print(json.dumps(report)[:300])


if __name__ == "__main__":
    main()
