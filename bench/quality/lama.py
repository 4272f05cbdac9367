"""LAMA T-REx knowledge probing on SmolLM2-135M-Instruct: LAMA's manual templates zero-shot
against P-tuning (one prompt per relation, trained on held-out facts of that relation).

    python -m bench.quality.lama --jobs 8        # all 41 relations (~6 min on one H100)
    python -m bench.render.results               # docs/RESULTS.md from every JSON

Protocol (the P-tuning paper's LAMA-29k setting for GPT-2, with SmolLM2's vocabulary in place
of GPT-2's): the candidates are the words of LAMA's common vocabulary that are one token of
the model after a space; facts whose object is not among them are left out of every split;
precision@1 is the argmax over the candidates of the next-token distribution at the end of
the template. Each relation's facts are split 60/20/20 (train/dev/test) by the recipe's
seeded hash order (`softprompt.data.lama`); P@1 is reported on test, for the best dev step.

Rows per relation:
  zero-shot        LAMA's manual template cut at [Y]: ``{X} was born in [MASK]``
  p-tuning         ``[P:3] {X} [P:3] [MASK]``: virtual tokens only around the subject
  p-tuning-anchors ``[P:3] {X} [P:3] was born in [MASK]``: the manual words kept as anchors
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.harness.baselines import run_ours
from bench.harness.report import (RESULTS, device_name, pct, run_command, run_parser, run_rows, run_settings,
                                  shown_command, start_report, subset, versions)

OUT = RESULTS / "quality_lama.json"
MODEL = "smollm2-135m"
VARIANTS = ("zero-shot", "p-tuning", "p-tuning-anchors")
LABELS = {"zero-shot": "manual template, zero-shot", "p-tuning": "P-tuning `[P:3] {X} [P:3] [MASK]`",
          "p-tuning-anchors": "P-tuning with the manual words as anchors"}


def anchored(manual: str) -> str:
    """``{X} was born in [MASK]`` -> ``[P:3] {X} [P:3] was born in [MASK]``."""
    before, after = manual.split("{X}", 1)
    return f"[P:3] {before}{{X}} [P:3]{after}"


def prepare(args) -> tuple[list[str], dict[str, dict]]:
    """The one-token candidates and, per relation, its filtered split files and templates."""
    from softprompt import PTuningV2Config, SoftPromptModel
    from softprompt.data import load_recipe
    from softprompt.data.lama import lama_relations
    from softprompt.base_models import load_base
    from softprompt.tasks import KnowledgeProbe

    base, tok = load_base(MODEL)
    root = load_recipe("lama-trex", args.data_root).root
    vessel = SoftPromptModel(base, PTuningV2Config(num_virtual_tokens=1, template="{X} was born in [MASK]"),
                             tokenizer=tok)
    probe = KnowledgeProbe(load_recipe("lama-trex", args.data_root).candidates(), single_token=True)
    probe.bind(vessel)
    kept = list(probe._strings)
    keep = set(kept)
    relations = args.relations or lama_relations(root)
    plans = {}
    for rel in relations:
        recipe = load_recipe(f"lama-trex:{rel}", args.data_root)
        plan = {"manual": recipe.templates["causal"], "files": {}, "facts": {}, "all_facts": {}}
        for split in ("train", "dev", "test"):
            facts = recipe.examples(split)
            kept_facts = [f for f in facts if f["Y"] in keep]
            path = Path(args.work) / f"{rel}.{split}.jsonl"
            path.write_text("".join(json.dumps(f) + "\n" for f in kept_facts))
            plan["files"][split] = str(path)
            plan["facts"][split] = len(kept_facts)
            plan["all_facts"][split] = len(facts)
        plans[rel] = plan
    return kept, plans


def run(name: str, args) -> dict:
    import torch

    from softprompt.base_models import load_base
    from softprompt.training.evaluate import evaluate_zero_shot
    from softprompt.training.config import RunConfig
    from softprompt.training.config import TrainConfig

    rel, variant = name.split("|")
    variant, _, lr = variant.partition("@")
    plan = args.plans[rel]
    options = {"candidates": args.candidates, "single_token": True}
    out = {"relation": rel, "variant": variant, "facts": plan["facts"]}
    if min(plan["facts"].values()) == 0:
        return {**out, "skipped": "a split has no fact with a one-token object"}
    files = plan["files"]
    if variant == "zero-shot":
        base, tok = load_base(MODEL)
        base.to("cuda" if torch.cuda.is_available() else "cpu")
        for split in ("dev", "test"):
            scores = evaluate_zero_shot(MODEL, f"lama-trex:{rel}", split=split, data_root=args.data_root,
                                        data_file=files[split], task_options=options, base_and_tokenizer=(base, tok))
            out["template"] = scores.pop("template")
            out[split] = {k: scores[k] for k in ("precision_at_1", "precision_at_10", "n")}
        return out
    template = "[P:3] {X} [P:3] [MASK]" if variant == "p-tuning" else anchored(plan["manual"])
    cfg = RunConfig(model=MODEL, method="p-tuning", task=f"lama-trex:{rel}", data_root=args.data_root,
                    train_file=files["train"], eval_file=files["dev"], test_file=files["test"], template=template,
                    prompt={"encoder": "lstm"}, task_options=options,
                    train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=float(lr),
                                      eval_every=args.eval_every, seed=args.seed, progress=False))
    result = run_ours(cfg)
    test = result["test"] or {}
    return {**out, "template": template, "lr": float(lr), "evals": result["evals"], "best_step": result["best_step"],
            "dev": {"precision_at_1": result["best_dev"]},
            "test": {k: test.get(k) for k in ("precision_at_1", "precision_at_10", "n")},
            "trainable_params": result["trainable_params"], "train_seconds": result["train_seconds"]}


def chosen(report: dict) -> dict[tuple[str, str], dict]:
    """(relation, variant) -> its run; of a variant's learning rates, the best on dev."""
    out: dict[tuple[str, str], dict] = {}
    for r in report["rows"]:
        if "error" in r or "skipped" in r:
            continue
        key = (r["relation"], r["variant"])
        if key not in out or r["dev"]["precision_at_1"] > out[key]["dev"]["precision_at_1"]:
            out[key] = r
    return out


def summary(report: dict) -> dict[str, dict]:
    """variant -> macro and micro P@1 over the relations every variant has."""
    picked = chosen(report)
    by = {v: {rel: r for (rel, var), r in picked.items() if var == v} for v in VARIANTS}
    rows = list(picked.values())
    present = [set(x) for x in by.values() if x]
    common = sorted(set.intersection(*present), key=lambda r: int(r[1:])) if rows and present else []
    out = {}
    for v in VARIANTS:
        got = [by[v][r]["test"] for r in common if r in by[v]]
        n = sum(t["n"] for t in got)
        out[v] = {"relations": len(got), "facts": n,
                  "macro": sum(t["precision_at_1"] for t in got) / len(got) if got else None,
                  "micro": sum(t["precision_at_1"] * t["n"] for t in got) / n if n else None}
    return out


def render(report: dict) -> list[str]:
    s = report["settings"]
    summ = summary(report)
    c = report.get("candidates", {})
    lines = [
        f"## LAMA T-REx precision@1, SmolLM2-135M-Instruct (`smollm2-135m`), {report['device']}",
        "",
        f"Rerun: `{shown_command(report['command'])}`, then `python -m bench.render.results`.",
        "",
        "The P-tuning paper's LAMA-29k protocol for GPT-2, with SmolLM2's vocabulary: candidates are the words of "
        f"LAMA's common vocabulary that are one SmolLM2 token after a space ({c.get('kept', '?'):,} of "
        f"{c.get('total', '?'):,}); facts whose object is not among them are left out of every split "
        f"({c.get('facts_kept', '?'):,} of {c.get('facts_total', '?'):,} facts kept); P@1 is the argmax over the "
        "candidates at the end of the template. Each relation's facts are split 60/20/20 by the recipe's seeded hash "
        "order (seed 0); one prompt per relation (bi-LSTM + MLP encoder, 6 virtual tokens), "
        f"{s['steps']} steps of {s['batch_size']} facts at each LR of {', '.join(f'{x:g}' for x in s['lrs'])}, dev "
        f"P@1 every {s['eval_every']} steps; per relation the LR and step with the best dev P@1, scored on test.",
        "",
        "| prompt | relations | test facts | macro P@1 % (mean over relations) | micro P@1 % |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        x = summ.get(v, {})
        lines.append(f"| {LABELS[v]} | {x.get('relations', 0)} | {x.get('facts', 0):,} | {pct(x.get('macro'))} | "
                     f"{pct(x.get('micro'))} |")
    rows = chosen(report) | {(r["row"].split("|")[0], r["row"].split("|")[1].split("@")[0]): r
                             for r in report["rows"] if "error" in r or "skipped" in r}
    relations = sorted({r["relation"] for r in report["rows"]}, key=lambda r: int(r[1:]))
    lines += ["", "Per relation (test P@1 %; facts train/dev/test):", "",
              "| relation | manual template | facts | zero-shot | P-tuning | P-tuning + anchors |", "|---|---|---|---|---|---|"]
    for rel in relations:
        cells = []
        for v in VARIANTS:
            r = rows.get((rel, v))
            cells.append("-" if r is None else "failed" if "error" in r else "skipped" if "skipped" in r
                         else pct(r["test"]["precision_at_1"]))
        any_row = next((rows[(rel, v)] for v in VARIANTS if (rel, v) in rows), {})
        f = any_row.get("facts", {})
        manual = next((rows[(rel, "zero-shot")].get("template") for _ in [0] if (rel, "zero-shot") in rows), "") or ""
        lines.append(f"| {rel} | `{manual}` | {f.get('train', '-')}/{f.get('dev', '-')}/{f.get('test', '-')} | "
                     + " | ".join(cells) + " |")
    lines += ["", "### Target of issue 3 (LAMA)", ""]
    z, p = summ.get("zero-shot", {}).get("macro"), max(
        (summ.get(v, {}).get("macro") or 0.0 for v in ("p-tuning", "p-tuning-anchors")), default=None)
    if z is not None and p:
        gap = 100 * (p - z)
        lines.append(f"- P-tuning at least 10 points above the manual templates (macro P@1 on test): "
                     f"{'**met**' if gap >= 10 else '**not met**'} ({pct(p)} vs {pct(z)}: {gap:+.1f} points).")
    else:
        lines.append("- P-tuning at least 10 points above the manual templates: not measured.")
    return lines + [""]


def main() -> None:
    parser = run_parser(__doc__, OUT, steps=300, batch_size=16, eval_every=50)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2],
                        help="P-tuning learning rates; per relation the best on dev is reported")
    parser.add_argument("--relations", nargs="+", default=None, help="default: all 41")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--only", nargs="+", default=None, metavar="REL|VARIANT[@LR]",
                        help="run just these rows (e.g. to finish an interrupted report; merge the JSONs after)")
    args = parser.parse_args()
    if args.only:
        args.relations = sorted({n.split("|")[0] for n in args.only}, key=lambda r: int(r[1:]))
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        args.candidates, args.plans = prepare(args)
        from softprompt.data import load_recipe

        total = len(load_recipe("lama-trex", args.data_root).candidates())
        facts_total = sum(sum(p["all_facts"].values()) for p in args.plans.values())
        facts_kept = sum(sum(p["facts"].values()) for p in args.plans.values())
        settings = run_settings(args) | {"lrs": args.lrs}
        header = {"benchmark": "LAMA T-REx P@1, SmolLM2-135M-Instruct", "device": device_name(), "settings": settings,
                  "versions": versions(),
                  "candidates": {"kept": len(args.candidates), "total": total, "facts_kept": facts_kept,
                                 "facts_total": facts_total},
                  "command": run_command("bench.quality.lama", args, " ".join(filter(None, [
                      "--lrs " + " ".join(f"{x:g}" for x in args.lrs), subset("--only", args.only, None),
                      subset("--relations", None if args.only else args.relations, None),
                      subset("--variants", args.variants, list(VARIANTS))])))}
        names = [f"{rel}|{v}" if v == "zero-shot" else f"{rel}|{v}@{lr:g}"
                 for rel in args.plans for v in args.variants for lr in ([0] if v == "zero-shot" else args.lrs)]
        if args.only:
            unknown = sorted(set(args.only) - set(names))
            if unknown:
                parser.error(f"--only: not rows of this report: {unknown}")
            names = [n for n in names if n in args.only]
        report = start_report(Path(args.out), header, names)

        def done(r: dict) -> str:
            return r.get("skipped") or f"test P@1 {r['test']['precision_at_1']:.3f} (n={r['test']['n']})"

        run_rows(run, names, args, report, Path(args.out), jobs=args.jobs, on_row=done)


if __name__ == "__main__":
    main()
