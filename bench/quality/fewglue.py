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

The method grid (issue 25 item 4), the same harness and budget (300 steps of 16, dev32 every
25 steps, two learning rates per method, the best on dev32 scored on val), one report per
seed, ``bench/results/quality_fewglue_methods_seed{N}.json``:

    python -m bench.quality.fewglue --grid methods --seed 0 --jobs 12   # 48 runs of ~1 min on one H100 (not timed)
    python -m bench.quality.fewglue --grid methods --seed 1 --jobs 12   # 54 runs: P-tuning's 6 too
    python -m bench.quality.fewglue --grid methods --seed 2 --jobs 12

Its rows (`VARIANTS`): vanilla prompt tuning (20 virtual tokens in front of the manual
template, default init: normal with the embeddings' std) and its initialisations from
vocabulary rows and from a task description (`DESCRIPTIONS`); residual prompt tuning; DePT
(10 virtual tokens and a rank-8 update of the first 256 input embeddings: every token a row
keeps, rows being cut at 256 tokens with the virtual ones, ``max_length``; 12,416 parameters against prompt
tuning's 11,520, 8% more, where SST-2's DePT row matched the budget over 64 tokens: BoolQ's
median input is 136 tokens); prefix tuning (the MLP projection, random init) and prefix
tuning started from the base's own keys and values of the task description (no projection,
which ``init="text"`` needs); P-tuning v2 (the same direct prefix from random init: the
like-for-like control of that initialisation); and, at seeds 1 and 2, P-tuning as above
(seed 0's P-tuning rows are those of ``quality_fewglue.json``, not rerun). A seed N run
seeds the data order (``train.seed``) and the prompt's initialisation (``prompt.init_seed``),
so seed 0 is the default of both, as the P-tuning rows ran.

Learning rates, two per method from SST-2's (`bench.quality.sst2.PROMPT_LR`): input prompts
(prompt tuning and its variants, DePT's short prompt) 3e-3 and 3e-2, SST-2's rate and the
decade below it, as P-tuning's pair takes its SST-2 rate 1e-2 and the decade below; deep
prompts 1e-3 and 1e-2, prefix tuning's SST-2 rate (its MLP collapsed to the majority class
at 1e-2 on MiniLM) and P-tuning v2's, so each prefix row runs at its own rate and the
other's. DePT's low-rank pair trains at ``train.delta_lr``'s default (1e-4, chosen on SST-2).

No HF PEFT rows here: the PEFT rows of the SST-2 table run through
`bench.harness.baselines.sentence_baseline`, a linear head over an encoder's mean state;
PEFT on a causal LM read through label words (the template rendered as ours, truncation,
best-state keeping and val scoring) would be a second harness, not written yet.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness.baselines import run_ours
from bench.harness.report import (RESULTS, device_name, pct, run_command, run_parser, run_rows, run_settings,
                                  shown_command, start_report, subset, versions)

OUT = RESULTS / "quality_fewglue.json"
METHODS_OUT = "quality_fewglue_methods_seed{seed}.json"  # under RESULTS: the method grid, one report per seed
MODEL = "smollm2-135m"
TASKS = {"fewglue-rte": "RTE", "fewglue-cb": "CB", "fewglue-boolq": "BoolQ"}
LRS = [1e-3, 1e-2]  # P-tuning's
INPUT_LRS = [3e-3, 3e-2]  # prompt tuning's SST-2 rate and the decade below (module docstring)
PREFIX_LRS = [1e-3, 1e-2]  # prefix tuning's and P-tuning v2's SST-2 rates
P = 20  # virtual tokens (per layer for deep prompts), as in the SST-2 table

# A task description per task, where a prompt starts from a text (init="text"): what the
# task asks, in the label words the verbalizer reads.
DESCRIPTIONS = {
    "fewglue-rte": "Does the premise entail the hypothesis? Answer Yes or No:",
    "fewglue-cb": "Does the premise entail the hypothesis? Answer Yes, No or Maybe:",
    "fewglue-boolq": "Answer the question about the passage with Yes or No:",
}

# name -> how its runs are built: the method, P (None: the template's [P:n] slots), the
# method config's fields (`describe`: init_text is the task's description) and the two LRs.
VARIANTS: dict[str, dict] = {
    "p-tuning": dict(method="p-tuning", label="P-tuning with anchors (bi-LSTM)", P=None, prompt={"encoder": "lstm"},
                     lrs=LRS),
    "prompt-tuning": dict(method="prompt-tuning", label="prompt tuning", P=P, prompt={}, lrs=INPUT_LRS),
    "prompt-tuning-init-vocab": dict(method="prompt-tuning", label="prompt tuning, init vocab", P=P,
                                     prompt={"init": "vocab"}, lrs=INPUT_LRS),
    "prompt-tuning-init-text": dict(method="prompt-tuning", label="prompt tuning, init text", P=P,
                                    prompt={"init": "text"}, describe=True, lrs=INPUT_LRS),
    # residual prompt tuning (Razdaibiedina et al. 2023): the table through a residual MLP while training
    "prompt-tuning-residual": dict(method="prompt-tuning", label="residual prompt tuning", P=P,
                                   prompt={"reparameterization": "residual"}, lrs=INPUT_LRS),
    # DePT (Shi & Lipani 2024): 10 virtual tokens and a rank-8 update of every input token a row keeps (256)
    "dept": dict(method="dept", label="DePT", P=10, prompt={"rank": 8, "max_input_length": 256}, lrs=INPUT_LRS),
    "prefix-tuning": dict(method="prefix-tuning", label="prefix tuning (projection, random init)", P=P, prompt={},
                          lrs=PREFIX_LRS),
    # the base's own keys and values of the description in every layer (causal LMs, no projection)
    "prefix-tuning-init-text": dict(method="prefix-tuning", label="prefix tuning, init text (no projection)", P=P,
                                    prompt={"projection": False, "init": "text"}, describe=True, lrs=PREFIX_LRS),
    # PTuningV2Config is PrefixTuningConfig without projection: the random-init control of init text
    "p-tuning-v2": dict(method="p-tuning-v2", label="P-tuning v2 (prefix, no projection, random init)", P=P,
                        prompt={}, lrs=PREFIX_LRS),
}


def runs() -> list[str]:
    """The rows of ``quality_fewglue.json`` (seed 0): zero-shot and P-tuning."""
    return [f"{t}|zero-shot" for t in TASKS] + [f"{t}|p-tuning@{lr:g}" for t in TASKS for lr in LRS]


def method_runs(seed: int) -> list[str]:
    """The method grid at `seed`: every variant but P-tuning at seed 0 (those rows are
    ``quality_fewglue.json``'s). BoolQ's first: its 3,270 test rows make its runs the longest,
    so they start before the short ones rather than trail them."""
    tasks = ["fewglue-boolq"] + [t for t in TASKS if t != "fewglue-boolq"]
    return [f"{t}|{v}@{lr:g}" for v, spec in VARIANTS.items() if v != "p-tuning" or seed != 0
            for t in tasks for lr in spec["lrs"]]


def all_runs() -> list[str]:
    return list(dict.fromkeys(runs() + method_runs(1)))


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
    variant, lr = variant.split("@")
    lr = float(lr)
    spec = VARIANTS[variant]
    prompt = dict(spec["prompt"])
    if spec.get("describe"):
        prompt["init_text"] = DESCRIPTIONS[task]
    prompt["init_seed"] = args.seed  # a seed draws the prompt too; 0 is every config's default (seed 0's P-tuning rows)
    cfg = RunConfig(model=MODEL, method=spec["method"], task=task, data_root=args.data_root, head="verbalizer",
                    num_virtual_tokens=spec["P"], prompt=prompt,
                    train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, eval_every=args.eval_every,
                                      seed=args.seed, progress=False))
    result = run_ours(cfg)
    row = {"variant": variant, "task": task, "lr": lr, "seed": args.seed, "method": spec["method"],
           "prompt_config": prompt, **{k: v for k, v in result.items() if k != "wall_seconds"}}
    if spec["method"] == "dept":
        row["delta_lr"] = cfg.train.delta_lr
    return row


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


# -- the method grid's section ----------------------------------------------------------------
def _comparable(report: dict) -> tuple:
    """A report's settings less the seed: the grid pools only reports run with the same budget."""
    return tuple(sorted((k, v) for k, v in report["settings"].items() if k != "seed"))


def selected(anchors: dict | None, reports: list[dict]) -> tuple[dict, list[str]]:
    """Per (variant, task, seed), the run kept: of the variant's learning rates, the one with
    the best dev32 accuracy (on a tie the lower rate, listed first, as the P-tuning table
    picks); a (variant, task, seed) with a learning rate missing or failed is left out and
    named. Seed 0's P-tuning rows come from ``quality_fewglue.json`` (`anchors`); a row
    measured twice counts once, the first report's."""
    by: dict[tuple[str, str, int], dict[float, dict]] = {}
    for report in ([anchors] if anchors else []) + list(reports):
        for r in report["rows"]:
            if "error" in r or r.get("variant") not in VARIANTS:
                continue
            key = (r["variant"], r["task"], r.get("seed", report["settings"]["seed"]))
            by.setdefault(key, {}).setdefault(r["lr"], r)
    kept, missing = {}, []
    for (variant, task, seed), at in sorted(by.items(), key=lambda kv: kv[0][2]):
        lrs = VARIANTS[variant]["lrs"]
        if not all(lr in at for lr in lrs):
            missing.append(f"{VARIANTS[variant]['label']}, {TASKS[task]}, seed {seed}: LR "
                           + ", ".join(f"{lr:g}" for lr in lrs if lr not in at) + " not measured")
            continue
        kept[(variant, task, seed)] = max((at[lr] for lr in lrs), key=lambda r: r["best_dev"])
    return kept, missing


def _stat(xs: list[float]) -> str:
    """``57.4 (54.2-61.0)``: the mean and the range over seeds, in %."""
    mean = sum(xs) / len(xs)
    return pct(mean) + (f" ({pct(min(xs))}-{pct(max(xs))})" if len(xs) > 1 else "")


def averages(kept: dict, variant: str) -> dict[int, float]:
    """seed -> the FewGLUE average (mean test accuracy over RTE, CB and BoolQ) of `variant`,
    for the seeds where all three tasks were measured."""
    seeds = {s for v, _, s in kept if v == variant}
    return {s: sum(kept[(variant, t, s)]["test"]["accuracy"] for t in TASKS) / len(TASKS)
            for s in sorted(seeds) if all((variant, t, s) in kept for t in TASKS)}


def gap(kept: dict, new: str, old: str) -> tuple[float, list[int]] | None:
    """(mean over their common seeds of `new`'s FewGLUE average minus `old`'s, in points;
    those seeds), or None where they share no fully measured seed."""
    a, b = averages(kept, new), averages(kept, old)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return 100 * sum(a[s] - b[s] for s in common) / len(common), common


def _gap_text(kept: dict, new: str, old: str) -> str:
    g = gap(kept, new, old)
    if g is None:
        return f"{VARIANTS[new]['label']}: not measured"
    return f"{VARIANTS[new]['label']}: {g[0]:+.2f} points (seeds {', '.join(map(str, g[1]))})"


def targets(kept: dict) -> list[str]:
    """The two FewGLUE targets of issue 25 item 4, from what is measured."""
    out = []
    candidates = ["prompt-tuning-residual", "dept", "prompt-tuning-init-vocab", "prompt-tuning-init-text"]
    gaps = {c: gap(kept, c, "prompt-tuning") for c in candidates}
    measured = {c: g for c, g in gaps.items() if g is not None}
    head = ("- (a) The best new method or initialisation (residual, DePT, init vocab, init text) at least 3 points "
            "over vanilla prompt tuning on the FewGLUE average: ")
    if not averages(kept, "prompt-tuning"):
        out.append(head + "not measured (vanilla prompt tuning has no seed with all three tasks).")
    elif not measured:
        out.append(head + "not measured (no candidate has a seed with all three tasks).")
    else:
        best = max(measured, key=lambda c: measured[c][0])
        unmeasured = [VARIANTS[c]["label"] for c in candidates if c not in measured]
        if measured[best][0] >= 3.0:
            verdict = "**met**"
        elif unmeasured:
            verdict = "**not met** by the measured ones (not measured: " + ", ".join(unmeasured) + ")"
        else:
            verdict = "**not met**"
        out.append(head + f"{verdict}: the best, {VARIANTS[best]['label']}, {measured[best][0]:+.2f} points. Each, "
                   "mean over the seeds it shares with vanilla prompt tuning: "
                   + "; ".join(_gap_text(kept, c, "prompt-tuning") for c in candidates)
                   + ". The best of four is picked on the same test numbers it is judged by, which favours it.")
    head = ("- (b) Prefix tuning started from the base's own keys and values of a text at least 5 points over "
            "random-init prefix tuning (FewGLUE average): ")
    controls = {"p-tuning-v2": "the same direct prefix from random init (P-tuning v2: the like-for-like control)",
                "prefix-tuning": "prefix tuning's default, the MLP projection from random init"}
    g = {c: gap(kept, "prefix-tuning-init-text", c) for c in controls}
    if not averages(kept, "prefix-tuning-init-text") or all(v is None for v in g.values()):
        out.append(head + "not measured (init text or both random-init prefixes have no seed with all three tasks).")
    else:
        met = {c: v[0] >= 5.0 for c, v in g.items() if v is not None}
        if not all(met.values()):
            verdict = "**not met**"
        elif len(met) == len(controls):
            verdict = "**met**"
        else:
            verdict = "**met** against the measured control only"
        out.append(head + f"{verdict}. Against " + "; against ".join(
            f"{text}: " + ("not measured" if g[c] is None else
                           f"{g[c][0]:+.2f} points (seeds {', '.join(map(str, g[c][1]))})")
            for c, text in controls.items()) + ".")
    return out


def render_methods(anchors: dict | None, reports: list[dict]) -> list[str]:
    """The method grid's section of docs/RESULTS.md (``quality_fewglue_methods_seed*.json``,
    P-tuning's seed 0 and the zero-shot row from ``quality_fewglue.json``): per task and
    method the test accuracy's mean and range over the seeds measured and the learning rate
    each seed kept, the FewGLUE average, and the issue's two targets."""
    if not reports:
        return []
    budget = _comparable(anchors or reports[0])
    used = [r for r in reports if _comparable(r) == budget]
    other = [r for r in reports if _comparable(r) != budget]
    if not used:
        return ["### FewGLUE method grid (issue 25 item 4), SmolLM2-135M-Instruct", "",
                "Not measured with the budget of the table above: every report of the grid ran with other settings.",
                ""] + [f"- left out ({rep['settings']}): `{shown_command(rep['command'])}`" for rep in other] + [""]
    kept, missing = selected(anchors if anchors and _comparable(anchors) == budget else None, used)
    s = (anchors or reports[0])["settings"]
    described = "; ".join(f'{TASKS[t]} "{d}"' for t, d in DESCRIPTIONS.items())
    lines = [f"### FewGLUE method grid (issue 25 item 4), SmolLM2-135M-Instruct, "
             f"{', '.join(dict.fromkeys(r['device'] for r in used))}", "",
             f"The harness of the table above: {s['steps']} steps of {s['batch_size']}, dev32 every {s['eval_every']} "
             "steps, each method at two learning rates, the run and step with the best dev32 accuracy scored on val "
             f"(test). Input prompts: {P} virtual tokens in front of the manual template (DePT: 10 and a rank-8 update "
             f"of the first 256 input embeddings), LRs {', '.join(f'{x:g}' for x in INPUT_LRS)}; deep prompts: {P} "
             f"key/value positions per layer under the manual template, LRs {', '.join(f'{x:g}' for x in PREFIX_LRS)}; "
             f"P-tuning LRs {', '.join(f'{x:g}' for x in LRS)}. A seed draws the data order and the prompt's "
             "initialisation. Init text: the task's description (" + described + "), its embeddings "
             "(prompt tuning) or the base's own keys and values of it (prefix tuning, no projection), repeated to "
             f"{P} tokens. FewGLUE average: the mean test accuracy over RTE, CB and BoolQ, per seed where all three "
             "were measured. No HF PEFT rows: PEFT on a causal LM read through label words needs a harness of its own "
             "(the SST-2 table's PEFT rows are a linear head over an encoder), not written yet.", "",
             "| method | RTE test acc. % | CB | BoolQ | FewGLUE average | seeds | LR kept per seed (RTE; CB; BoolQ) | "
             "trainable params |", "|---|---|---|---|---|---|---|---|"]
    zero = {r["task"]: r for r in (anchors or {}).get("rows", []) if r.get("variant") == "zero-shot" and "error" not in r}
    if zero:
        cells = [pct(zero[t]["test"]["accuracy"]) if t in zero else "not measured" for t in TASKS]
        avg = pct(sum(zero[t]["test"]["accuracy"] for t in TASKS) / len(TASKS)) if len(zero) == len(TASKS) else "-"
        lines.append(f"| zero-shot manual prompt (no training) | {' | '.join(cells)} | {avg} | - | - | 0 |")
    for variant, spec in VARIANTS.items():
        per_task = {t: [(seed, kept[(v, task, seed)]) for v, task, seed in kept if v == variant and task == t]
                    for t in TASKS}
        seeds = sorted({seed for runs_ in per_task.values() for seed, _ in runs_})
        cells, lrs, params = [], [], None
        for t, runs_ in per_task.items():
            own = [seed for seed, _ in runs_]
            cells.append((_stat([r["test"]["accuracy"] for _, r in runs_]) if runs_ else "not measured")
                         + (f", seeds {', '.join(map(str, own))}" if runs_ and own != seeds else ""))
            lrs.append(", ".join(f"{r['lr']:g}" for _, r in runs_) or "-")
            params = params or next((r["trainable_params"] for _, r in runs_), None)
        avg = averages(kept, variant)
        lines.append(f"| {spec['label']} | {' | '.join(cells)} | "
                     f"{_stat(list(avg.values())) if avg else 'not measured'} | "
                     f"{', '.join(map(str, seeds)) or '-'} | {'; '.join(lrs)} | "
                     f"{f'{params:,}' if params is not None else '-'} |")
    lines += ["", "Mean (min-max) over the seeds listed; a seed counts for a task when both learning rates ran."]
    lines += [f"- not counted: {m}" for m in missing]
    failed = [(rep["settings"]["seed"], r) for rep in used for r in rep["rows"] if "error" in r]
    lines += [f"- failed: {r['row']} (seed {seed}): {r['error'][:160]}" for seed, r in failed]
    lines += [f"- left out, run with other settings ({rep['settings']}): `{shown_command(rep['command'])}`"
              for rep in other]
    lines += ["", "Targets of issue 25 item 4 (FewGLUE average, SmolLM2-135M-Instruct; a gap is the mean over the "
              "seeds both rows measured of the per-seed difference):", ""] + targets(kept)
    commands = list(dict.fromkeys(shown_command(r["command"]) for r in used))
    return lines + ["", "Rerun, per seed: " + "; ".join(f"`{c}`" for c in commands)
                    + ", then `python -m bench.render.results`.", ""]


def main() -> None:
    parser = run_parser(__doc__, OUT, steps=300, batch_size=16, eval_every=25)
    parser.add_argument("--grid", choices=["anchors", "methods"], default="anchors",
                        help="anchors: zero-shot vs P-tuning (quality_fewglue.json); methods: the method grid at "
                             "--seed (quality_fewglue_methods_seed{N}.json)")
    parser.add_argument("--runs", nargs="+", default=None, choices=all_runs(), metavar="RUN",
                        help="runs to run (default: the grid's); names: task|zero-shot, task|variant@lr")
    parser.set_defaults(out=None)  # the grid's report (below)
    args = parser.parse_args()
    default = runs() if args.grid == "anchors" else method_runs(args.seed)
    args.runs = args.runs or default
    args.out = args.out or str(OUT if args.grid == "anchors" else RESULTS / METHODS_OUT.format(seed=args.seed))
    from softprompt.base_models import load_base

    load_base(MODEL)  # converts the GGUF once, before the workers start
    grid = "" if args.grid == "anchors" else "--grid methods"
    extra = " ".join(x for x in (grid, subset("--runs", args.runs, default)) if x)
    header = {"benchmark": "FewGLUE, SmolLM2-135M-Instruct" + (" (method grid)" if grid else ""),
              "device": device_name(), "settings": run_settings(args), "versions": versions(),
              "command": run_command("bench.quality.fewglue", args, extra)}
    report = start_report(Path(args.out), header, list(args.runs))

    def done(r: dict) -> str:
        return f"zero-shot test {r['test']}" if r["variant"] == "zero-shot" else f"test {r.get('test')}"

    run_rows(run, list(args.runs), args, report, Path(args.out), jobs=args.jobs, on_row=done)


if __name__ == "__main__":
    main()
