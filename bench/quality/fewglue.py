"""FewGLUE (32 training examples) on SmolLM2-135M-Instruct: the manual prompt zero-shot
against P-tuning with anchors (the P-tuning paper's few-shot setting, on a frozen model).

    python -m bench.quality.fewglue --jobs 6     # every row (~3 min on one H100)
    python -m bench.render.results               # docs/RESULTS.md from every JSON

Zero-shot: the recipe's manual causal template (``{premise} Question: {hypothesis} ?
Answer: [MASK]``), label words read at the end (Yes / No / Maybe), no trained vectors.
P-tuning: the same words with virtual tokens between them (``{premise} [P:3] Question:
{hypothesis} ? [P:3] Answer: [MASK]``: "Question:", "?" and "Answer:" are the anchors), a
bi-LSTM + MLP prompt encoder, trained on ``train.jsonl`` (32 examples) at two learning
rates; the run and step with the best ``dev32`` accuracy are kept and scored on
``val.jsonl`` (the official SuperGLUE validation set, the paper's test set).
"""

from __future__ import annotations

from pathlib import Path

from bench.harness.baselines import run_ours
from bench.harness.report import (RESULTS, device_name, pct, run_command, run_parser, run_rows, run_settings,
                                  shown_command, start_report, subset, versions)

OUT = RESULTS / "quality_fewglue.json"
MODEL = "smollm2-135m"
TASKS = {"fewglue-rte": "RTE", "fewglue-cb": "CB", "fewglue-boolq": "BoolQ"}
LRS = [1e-3, 1e-2]


def runs() -> list[str]:
    return [f"{t}|zero-shot" for t in TASKS] + [f"{t}|p-tuning@{lr:g}" for t in TASKS for lr in LRS]


def run(name: str, args) -> dict:
    import torch

    from softprompt.base_models import load_base
    from softprompt.training.evaluate import evaluate_zero_shot
    from softprompt.training.config import RunConfig
    from softprompt.training.config import TrainConfig

    task, variant = name.split("|")
    if variant == "zero-shot":
        base, tok = load_base(MODEL)
        base.to("cuda" if torch.cuda.is_available() else "cpu")
        from collections import Counter

        from softprompt.data import load_recipe

        test = load_recipe(task, args.data_root).examples("test")
        top = Counter(str(e["label"]) for e in test).most_common(1)[0]
        out = {"variant": "zero-shot", "task": task, "majority": {"label": top[0], "accuracy": top[1] / len(test)}}
        for split in ("dev", "test"):
            scores = evaluate_zero_shot(MODEL, task, split=split, data_root=args.data_root, base_and_tokenizer=(base, tok))
            out["template"] = scores.pop("template")
            out[split] = {k: v for k, v in scores.items() if k != "split"}
        return out
    lr = float(variant.split("@")[1])
    cfg = RunConfig(model=MODEL, method="p-tuning", task=task, data_root=args.data_root, head="verbalizer",
                    prompt={"encoder": "lstm"},
                    train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, eval_every=args.eval_every,
                                      seed=args.seed, progress=False))
    result = run_ours(cfg)
    return {"variant": "p-tuning", "task": task, "lr": lr, **{k: v for k, v in result.items() if k != "wall_seconds"}}


def render(report: dict) -> list[str]:
    s = report["settings"]
    rows = [r for r in report["rows"] if "error" not in r]
    lines = [
        f"## FewGLUE (32 training examples), SmolLM2-135M-Instruct (`smollm2-135m`), {report['device']}",
        "",
        f"Rerun: `{shown_command(report['command'])}`, then `python -m bench.render.results`.",
        "",
        "Test = `val.jsonl` (the official SuperGLUE validation set, as in the P-tuning paper); model selection on "
        f"`dev32.jsonl`. P-tuning: bi-LSTM + MLP prompt encoder, 6 virtual tokens around the anchors, frozen model, "
        f"{s['steps']} steps of {s['batch_size']}, dev32 every {s['eval_every']} steps, learning rates "
        f"{', '.join(f'{x:g}' for x in LRS)} (the best on dev32 reported), seed {s['seed']}.",
        "",
        "| task | zero-shot manual prompt, test acc. % | P-tuning with anchors, test acc. % | P-tuning LR | dev32 acc. %: zero-shot / P-tuning | test n |",
        "|---|---|---|---|---|---|",
    ]
    for task, label in TASKS.items():
        zero = next((r for r in rows if r["task"] == task and r["variant"] == "zero-shot"), None)
        tuned = [r for r in rows if r["task"] == task and r["variant"] == "p-tuning"]
        best = max(tuned, key=lambda r: r["best_dev"]) if tuned else None
        z_test = zero["test"] if zero else {}
        b_test = (best or {}).get("test") or {}
        extra = ""
        if "macro_f1" in z_test or "macro_f1" in b_test:
            extra = f" (macro-F1 {pct(z_test.get('macro_f1'))} / {pct(b_test.get('macro_f1'))})"
        lines.append(
            f"| {label}{extra} | {pct(z_test.get('accuracy'))} | {pct(b_test.get('accuracy'))} | "
            f"{best['lr']:g} |" if best else f"| {label}{extra} | {pct(z_test.get('accuracy'))} | not measured | - |")
        lines[-1] += (f" {pct(zero['dev']['accuracy']) if zero else '-'} / {pct(best['best_dev']) if best else '-'} | "
                      f"{z_test.get('n', b_test.get('n', '-'))} |")
    lines += ["", "Templates:", ""]
    for r in rows:
        if r["variant"] == "zero-shot" or (r["variant"] == "p-tuning" and r.get("lr") == LRS[0]):
            lines.append(f"- {TASKS[r['task']]} {r['variant']}: `{r['template']}`")
    failed = [r for r in report["rows"] if "error" in r]
    lines += [f"- failed: {r['row']}: {r['error'][:160]}" for r in failed]
    majority = ", ".join(f"{TASKS[r['task']]} {pct(r['majority']['accuracy'])}% ({r['majority']['label']})"
                         for r in rows if r["variant"] == "zero-shot" and "majority" in r)
    lines += ["", f"Majority-class accuracy on test: {majority}. A frozen 135M-parameter model is weak at these "
              "tasks; the numbers say what it reaches with each prompt, not what the method reaches on the paper's "
              "much larger models.", ""]
    return lines


def main() -> None:
    parser = run_parser(__doc__, OUT, steps=300, batch_size=16, eval_every=25)
    parser.add_argument("--runs", nargs="+", default=runs(), choices=runs())
    args = parser.parse_args()
    from softprompt.base_models import load_base

    load_base(MODEL)  # converts the GGUF once, before the workers start
    header = {"benchmark": "FewGLUE, SmolLM2-135M-Instruct", "device": device_name(), "settings": run_settings(args),
              "versions": versions(), "command": run_command("bench.quality.fewglue", args, subset("--runs", args.runs, runs()))}
    report = start_report(Path(args.out), header, list(args.runs))

    def done(r: dict) -> str:
        return f"test {r.get('test')}" if r["variant"] == "p-tuning" else f"zero-shot test {r['test']}"

    run_rows(run, list(args.runs), args, report, Path(args.out), jobs=args.jobs, on_row=done)


if __name__ == "__main__":
    main()
