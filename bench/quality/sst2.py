"""SST-2 quality report: every softprompt method, HF PEFT's same methods, a linear probe and
full fine-tuning on all-MiniLM-L6-v2, all with the same data order, steps, batch size,
learning rates, seed, head and pooling.

    python -m bench.quality.sst2 --jobs 8                     # every row (~5 min on one H100)
    python -m bench.quality.sst2 --rows p-tuning-v2 full-ft   # a subset (merged into the JSON)
    python -m bench.render.results                            # docs/RESULTS.md from every JSON

Writes bench/results/quality_sst2.json after every row, so a partial run survives; rows of
an earlier run with the same settings (steps, batch size, eval interval, seed) are kept
unless rerun.

Every row: a linear head (dropout 0.1) over the mean of the last hidden states of the real
tokens ([CLS] text [SEP], never the virtual positions), AdamW (no weight decay), a linear
warm-up over 6% of the steps then linear decay, gradient clipping at 1.0, the batches of
`softprompt.training.order.epoch_batches` (length-bucketed, seeded), bf16 autocast on a GPU. Our
rows go through `softprompt.training.run.run_training` (what `softprompt train` runs); the PEFT and
baseline rows through `bench.harness.baselines.sentence_baseline`, which copies that loop's
settings from `TrainConfig`'s defaults.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness.baselines import run_ours, sentence_baseline
from bench.harness.report import (RESULTS, device_name, run_command, run_parser, run_rows, run_settings, shown_command,
                                  start_report, subset, versions)

OUT = RESULTS / "quality_sst2.json"
P = 20  # virtual tokens, every method
HEAD_LR = 5e-3
FULL_FT_LR = 5e-5
# One prompt LR per method, the same for our row and PEFT's. Prefix tuning's MLP
# reparameterisation collapses to the majority class at 1e-2 on this model (measured with
# an earlier version of this script at 300 steps: 50.9%), so it gets 1e-3.
PROMPT_LR = {"prompt-tuning": 3e-2, "p-tuning": 1e-2, "prefix-tuning": 1e-3, "p-tuning-v2": 1e-2, "dept": 3e-2}

# name -> how the row is built. `peft`: (config class, keyword arguments) -- the sizes are set
# so that the reparameterisation matches ours where PEFT allows it (LSTM: identical; MLP: PEFT's
# has three layers, ours two; prefix projection: identical, hidden 512).
ROWS: dict[str, dict] = {
    "prompt-tuning": dict(impl="softprompt", method="prompt-tuning", label="prompt tuning"),
    # residual prompt tuning (Razdaibiedina et al. 2023): the same table through a residual MLP while training
    "prompt-tuning-residual": dict(impl="softprompt", method="prompt-tuning", label="residual prompt tuning",
                                   prompt={"reparameterization": "residual"}),
    # DePT (Shi & Lipani 2024): prompt tuning's 20 x 384 budget split into 10 virtual tokens and a rank-8 update
    # of the first 64 input embeddings (3,840 + 8 x (64 + 384) = 7,424 against 7,680); low-rank LR: train.delta_lr's
    # default (1e-3 when its seed-0 row ran, 1e-4 since the sweep below; each row records the rate it ran with)
    "dept": dict(impl="softprompt", method="dept", label="DePT", P=10, prompt={"rank": 8, "max_input_length": 64}),
    # prompt tuning's initialisation (issue 25 item 2): the table drawn from the vocabulary embeddings' rows, or
    # the embeddings of a task description, against the default (normal with the embeddings' std)
    "prompt-tuning-init-vocab": dict(impl="softprompt", method="prompt-tuning", label="prompt tuning, init vocab",
                                     prompt={"init": "vocab"}),
    "prompt-tuning-init-text": dict(impl="softprompt", method="prompt-tuning", label="prompt tuning, init text",
                                    prompt={"init": "text", "init_text": "Classify the sentiment of this movie review "
                                                                         "as positive or negative:"}),
    # where a deep prompt starts (issue 25 item 2): every key and value 0 against the default (normal noise,
    # init_std 1); the base's own keys and values of a text (init="text") are a causal LM's only
    "p-tuning-v2-init-zeros": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2, init zeros",
                                   prompt={"init": "zeros"}),
    # DePT's second learning rate (the low-rank update's), swept around the default it had then (1e-3)
    "dept-dlr1e-4": dict(impl="softprompt", method="dept", label="DePT", P=10, prompt={"rank": 8, "max_input_length": 64},
                         train={"delta_lr": 1e-4}),
    "dept-dlr1e-2": dict(impl="softprompt", method="dept", label="DePT", P=10, prompt={"rank": 8, "max_input_length": 64},
                         train={"delta_lr": 1e-2}),
    "p-tuning-lstm": dict(impl="softprompt", method="p-tuning", label="P-tuning (LSTM)", prompt={"encoder": "lstm"}),
    "p-tuning-mlp": dict(impl="softprompt", method="p-tuning", label="P-tuning (MLP)", prompt={"encoder": "mlp"}),
    "prefix-tuning": dict(impl="softprompt", method="prefix-tuning", label="prefix tuning (projection)"),
    "p-tuning-v2": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2"),
    "peft-prompt-tuning": dict(impl="peft", method="prompt-tuning", label="prompt tuning",
                               peft=("PromptTuningConfig", {})),
    "peft-p-tuning-lstm": dict(impl="peft", method="p-tuning", label="P-tuning (LSTM)",
                               peft=("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM",
                                                             "encoder_hidden_size": 192})),
    "peft-p-tuning-mlp": dict(impl="peft", method="p-tuning", label="P-tuning (MLP)",
                              peft=("PromptEncoderConfig", {"encoder_reparameterization_type": "MLP",
                                                            "encoder_hidden_size": 384})),
    "peft-prefix-tuning": dict(impl="peft", method="prefix-tuning", label="prefix tuning (projection)",
                               peft=("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 512})),
    # PEFT has no method named P-tuning v2: its prefix tuning without projection is that method.
    "peft-p-tuning-v2": dict(impl="peft", method="p-tuning-v2", label="P-tuning v2 (prefix, no projection)",
                             peft=("PrefixTuningConfig", {"prefix_projection": False})),
    "linear-probe": dict(impl="baseline", method="linear-probe", label="linear probe (frozen encoder)"),
    "full-ft": dict(impl="baseline", method="full-fine-tuning", label="full fine-tuning"),
    # The first target compares the two at their best: two more learning rates for each.
    "p-tuning-v2-lr5e-3": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2", lr=5e-3),
    "p-tuning-v2-lr3e-2": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2", lr=3e-2),
    "full-ft-lr2e-5": dict(impl="baseline", method="full-fine-tuning", label="full fine-tuning", lr=2e-5),
    "full-ft-lr1e-4": dict(impl="baseline", method="full-fine-tuning", label="full fine-tuning", lr=1e-4),
    # and the prompt length, which P-tuning v2 tunes per task (full fine-tuning has no such knob)
    "p-tuning-v2-lr5e-2": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2", lr=5e-2),
    "p-tuning-v2-P64-lr1e-2": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2", lr=1e-2, P=64),
    "p-tuning-v2-P64-lr3e-2": dict(impl="softprompt", method="p-tuning-v2", label="P-tuning v2", lr=3e-2, P=64),
}
# The order rows run in: the rows of the first target first, then each pair.
RUN_ORDER = ["p-tuning-v2", "full-ft", "linear-probe", "prompt-tuning", "peft-prompt-tuning", "p-tuning-mlp",
             "peft-p-tuning-mlp", "p-tuning-lstm", "peft-p-tuning-lstm", "prefix-tuning", "peft-prefix-tuning",
             "peft-p-tuning-v2", "p-tuning-v2-lr5e-3", "p-tuning-v2-lr3e-2", "full-ft-lr2e-5", "full-ft-lr1e-4",
             "p-tuning-v2-lr5e-2", "p-tuning-v2-P64-lr1e-2", "p-tuning-v2-P64-lr3e-2"]
PAIRS = [("prompt-tuning", "peft-prompt-tuning"), ("p-tuning-lstm", "peft-p-tuning-lstm"),
         ("p-tuning-mlp", "peft-p-tuning-mlp"), ("prefix-tuning", "peft-prefix-tuning"),
         ("p-tuning-v2", "peft-p-tuning-v2")]


def row_lrs(name: str) -> tuple[float | None, float]:
    """(prompt or encoder LR, head LR) of a row."""
    spec = ROWS[name]
    if spec["impl"] == "baseline":
        return (spec.get("lr", FULL_FT_LR) if spec["method"] == "full-fine-tuning" else None), HEAD_LR
    return spec.get("lr", PROMPT_LR[spec["method"]]), HEAD_LR


# -- our rows -----------------------------------------------------------------------
def ours(name: str, args) -> dict:
    from softprompt.training.config import RunConfig
    from softprompt.training.config import TrainConfig

    spec = ROWS[name]
    lr, head_lr = row_lrs(name)
    deep = spec["method"] in ("prefix-tuning", "p-tuning-v2")
    n = spec.get("P", P)
    cfg = RunConfig(model="minilm", method=spec["method"], task="sst2", head="linear", data_root=args.data_root,
                    num_virtual_tokens=n, template=None if deep else f"[P:{n}] {{text}}",
                    prompt=dict(spec.get("prompt", {})),
                    train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, head_lr=head_lr,
                                      eval_every=args.eval_every, seed=args.seed, progress=False,
                                      **spec.get("train", {})))
    result = run_ours(cfg)
    return {"num_virtual_tokens": n, "template": result["template"], "prompt_config": cfg.prompt, "trainable_params": result["trainable_params"],
            "evals": result["evals"], "best_dev_accuracy": result["best_dev"], "best_step": result["best_step"],
            # under the held-out protocol the step is selected on rows held out of train, and
            # GLUE dev (never selected on) is reported at it
            "reported_accuracy": result["test"], "train_seconds": result["train_seconds"],
            "train_overrides": spec.get("train", {}),
            **({"delta_lr": cfg.train.delta_lr} if spec["method"] == "dept" else {})}


# -- PEFT and baseline rows: one loop with the settings of softprompt.training.loop ----------
def baseline(name: str, args) -> dict:
    """A PEFT or baseline row (`bench.harness.baselines.sentence_baseline`)."""
    from softprompt.training.config import TrainConfig

    spec = ROWS[name]
    lr, head_lr = row_lrs(name)
    t = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed)
    return sentence_baseline(t, model="minilm", task="sst2", data_root=args.data_root, lr=lr, head_lr=head_lr, P=P,
                             peft=spec.get("peft"), full=spec["method"] == "full-fine-tuning")


def run_row(name: str, args) -> dict:
    spec = ROWS[name]
    lr, head_lr = row_lrs(name)
    row = {"method": spec["method"], "label": spec["label"], "implementation": spec["impl"],
           "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "prompt_lr": lr, "head_lr": head_lr,
           "num_virtual_tokens": spec.get("P", P) if spec["impl"] != "baseline" else 0}
    if spec["method"] == "full-fine-tuning":
        row["encoder_lr"], row["prompt_lr"] = lr, None
    row |= ours(name, args) if spec["impl"] == "softprompt" else baseline(name, args)
    row["final_dev_accuracy"] = row["evals"][-1][1]
    return row


def _held_out_label(row: dict) -> str:
    """A held-out row's label and the rates it ran with: DePT's ``delta_lr`` as recorded
    (rows before it was recorded ran at the default of their day, 1e-3, and say so in
    ``train_overrides``), other overrides as given."""
    rates = dict(row.get("train_overrides", {}))
    if "delta_lr" in row:
        rates["delta_lr"] = row["delta_lr"]
    return row["label"] + "".join(f", {k} {v:g}" for k, v in rates.items())


def render_held_out(reports: list[dict]) -> list[str]:
    """A section of docs/RESULTS.md: rows run under the held-out protocol (issue 25), one
    report per seed and row set (``quality_sst2_residual_seed*.json``, ``quality_sst2_dept_seed*.json``,
    ``quality_sst2_dept_sweep_seed*.json``, ``quality_sst2_init_seed*.json``,
    ``quality_sst2_deep_init_seed*.json``): the step selected on rows held out of train, GLUE
    dev (never selected on) reported at it; mean and spread over seeds."""
    if not reports:
        return []
    by_row: dict[str, list[dict]] = {}  # a row's label with the learning rates it ran with -> its seeds
    for report in sorted(reports, key=lambda rep: rep["settings"]["seed"]):  # each row's seeds in order
        for r in report["rows"]:
            if "error" not in r and r.get("reported_accuracy") is not None:
                by_row.setdefault(_held_out_label(r), []).append(r)
    s = reports[0]["settings"]
    lines = [f"## SST-2 under the held-out protocol: prompt tuning and P-tuning v2 (and where they start), residual prompt tuning and DePT, all-MiniLM-L6-v2, "
             f"{reports[0]['device']}", "",
             f"The settings of the table above ({s['steps']} steps of {s['batch_size']}, the same head, {P} virtual "
             f"tokens, prompt LR {PROMPT_LR['prompt-tuning']:g}), but the step is selected on 1,000 rows held out of train with the run's seed and "
             "GLUE dev (872 sentences) is reported at it, never selected on. Residual prompt tuning "
             "(`prompt.reparameterization: residual`, bottleneck 400) trains the same table through a residual MLP. "
             "Prompt tuning's table starts as normal noise with the vocabulary embeddings' std (the default), as rows "
             "drawn from the vocabulary embeddings (`init vocab`) or as the embeddings of a task description repeated "
             "to 20 tokens (`init text`: \"Classify the sentiment of this movie review as positive or negative:\"). "
             "P-tuning v2's prefix starts as normal noise (the default) or as zeros (`init zeros`), at P-tuning v2's "
             f"prompt LR {PROMPT_LR['p-tuning-v2']:g} (a prefix from the base's own keys and values of a text is "
             "for causal LMs). "
             "DePT (`--method dept`) splits prompt tuning's parameter budget into 10 virtual tokens and a rank-8 "
             "update of the first 64 input embeddings (7,424 parameters against 7,680), its low-rank pair at the "
             "`delta_lr` its row names (the sweep of `quality_sst2_dept_sweep_seed*.json` chose the default, 1e-4).",
             "",
             "| method | seeds | held-out acc. % at the selected step | GLUE dev acc. % (reported) | selected steps | "
             "trainable params |", "|---|---|---|---|---|---|"]
    for name, rows in by_row.items():
        held = [r["best_dev_accuracy"] for r in rows]
        dev = [r["reported_accuracy"]["accuracy"] for r in rows]

        def stat(xs: list[float]) -> str:
            mean = sum(xs) / len(xs)
            return f"{100 * mean:.2f}" + (f" (min {100 * min(xs):.2f}, max {100 * max(xs):.2f})" if len(xs) > 1 else "")
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rows)} | {stat(held)} | {stat(dev)} | "
                     f"{', '.join(str(r['best_step']) for r in rows)} | {rows[0]['trainable_params']:,} |")
    commands = list(dict.fromkeys(shown_command(r["command"]) for r in reports))
    lines += ["", "Rerun, per seed: " + "; ".join(f"`{c}`" for c in commands) + ".", ""]
    return lines


# -- the report ---------------------------------------------------------------------
def _acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _lr(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def render(report: dict, seed_reports: list[dict] = ()) -> list[str]:
    """The SST-2 section of docs/RESULTS.md, from the JSON report and the reports of further
    seeds (no number typed by hand)."""
    rows = {r["row"]: r for r in report["rows"]}
    seeds = [{r["row"]: r for r in rep["rows"]} for rep in seed_reports]
    ok = {k: r for k, r in rows.items() if "error" not in r}
    order = [n for n in ROWS if n in rows]
    s = report["settings"]
    v = report["versions"]
    lines = [
        f"## SST-2 dev accuracy, all-MiniLM-L6-v2 (`minilm`), {report['device']}",
        "",
        f"Rerun: `{shown_command(report['command'])}` (writes `bench/results/quality_sst2.json`), then "
        "`python -m bench.render.results`.",
        "",
        f"{s['steps']} steps of {s['batch_size']} sentences, seed {s['seed']}, the same length-bucketed data order "
        f"(`softprompt.training.order.epoch_batches`) for every row; accuracy on all {report.get('dev_size', 872)} dev sentences "
        f"every {s['eval_every']} steps and at the end. Every row has the same head: dropout 0.1 and a linear layer over "
        "the mean of the last hidden states of the real tokens (`[CLS] text [SEP]`, virtual positions dropped). AdamW "
        "without weight decay, linear warm-up over 6% of the steps then linear decay, gradient clipping at 1.0. "
        f"{P} virtual tokens unless the table says otherwise (input methods: template `[P:{P}] {{text}}`; deep methods: "
        f"{P} key/value positions per layer). The encoder is frozen except in full fine-tuning. Data: "
        + report.get("data", "SST-2").rstrip(".") + ".",
        "",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v.get('peft', '-')}, softprompt "
        f"{v['softprompt']}, Python {v['python']}. Finished: {report.get('finished', 'not yet (partial run)')}. "
        f"{report.get('parallel', '')}",
        "",
        "Learning rates (prompt / encoder; the head always 5e-3), the same for our row and PEFT's: "
        + ", ".join(f"{m} {lr:g}" for m, lr in PROMPT_LR.items())
        + f"; full fine-tuning {FULL_FT_LR:g} for the encoder. Prefix tuning gets 1e-3 because its MLP "
        "reparameterisation collapses to the majority class at 1e-2 on this model.",
        "",
        "| method | implementation | virtual tokens | prompt / encoder LR | trainable params | best dev acc. % (step) | final dev acc. % | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        r = rows[name]
        lr = r.get("encoder_lr") or r.get("prompt_lr")
        if "error" in r:
            lines.append(f"| {ROWS[name]['label']} | {ROWS[name]['impl']} | | {_lr(lr)} | - | failed: {r['error'][:120]} | - | - |")
            continue
        lines.append(f"| {r['label']} | {r['implementation']} | {r['num_virtual_tokens'] or '-'} | {_lr(lr)} | "
                     f"{r['trainable_params']:,} | "
                     f"{_acc(r['best_dev_accuracy'])} ({r['best_step']}) | {_acc(r['final_dev_accuracy'])} | "
                     f"{r.get('train_seconds') or r['wall_seconds']:.0f} s |")
    missing = [n for n in RUN_ORDER if n not in rows]
    if missing:
        lines += ["", "Not run in this report: " + ", ".join(f"`{n}`" for n in missing) + "."]
    lines += ["", "Dev accuracy at each evaluation (step: %):", ""]
    for name in order:
        if "error" not in rows[name]:
            curve = ", ".join(f"{st}: {_acc(a)}" for st, a in rows[name]["evals"])
            r = rows[name]
            lines.append(f"- {r['implementation']} {r['label']} (LR {_lr(r.get('encoder_lr') or r.get('prompt_lr'))}"
                         f"{', P=' + str(r['num_virtual_tokens']) if r['num_virtual_tokens'] else ''}): {curve}")
    lines += [
        "",
        "Notes on the comparison:",
        "",
        "- A single seed on 872 sentences: the standard error of one accuracy near 85% is about 1.2 points, so "
        "differences under ~2 points between two rows are within noise.",
        "- \"best\" is the best of the periodic evaluations on the dev set, which is also the reported set "
        "(SST-2's test labels are not public); \"final\" is the last step, with no selection.",
        "- PEFT's P-tuning LSTM encoder is built the same as ours (bi-LSTM of 2 x 192, then 384 -> 384 -> 384); "
        "PEFT's MLP encoder has three layers (384 -> 384 -> 384 -> 384) where ours has two; PEFT's prefix projection "
        "is the same as ours (384 -> 512 -> 6 x 2 x 384, tanh). PEFT's prompt tuning places the virtual tokens before "
        "`[CLS]` and initialises them from N(0, 1); ours places them after `[CLS]` with the vocabulary embeddings' "
        "std (P-tuning's input vectors likewise: N(0, 1) in PEFT, that std in ours). PEFT has no method called "
        "P-tuning v2: its prefix tuning without projection is that method.",
        "- Train time is the training loop's own time (evaluations excluded for our rows, included for the others); "
        "rows ran in parallel processes sharing the device, so times compare only roughly.",
    ]
    return lines + seeds_table(ok, seeds) + ["", "### Targets of issue 3 (SST-2)", ""] + targets(ok, seeds) + [""]


def _runs(name: str, ok: dict, seeds: list[dict]) -> list[dict]:
    """Row `name` at seed 0 (`ok`) and at every further seed that has it."""
    return [r for r in [ok.get(name)] + [s.get(name) for s in seeds] if r is not None and "error" not in r]


def _mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _spread(runs: list[dict], key: str = "best_dev_accuracy") -> str:
    """``85.51 (85.55 / 85.78 / 85.21)``: the mean and each seed's value."""
    values = " / ".join(_acc(r[key]) for r in runs)
    return f"{_acc(_mean(runs, key))} ({values})" if len(runs) > 1 else _acc(runs[0][key])


def seeds_table(ok: dict, seeds: list[dict]) -> list[str]:
    """Rows that ran at several seeds: each seed's best dev accuracy and the mean."""
    names = [n for n in ROWS if len(_runs(n, ok, seeds)) > 1]
    if not names:
        return []
    n_seeds = 1 + len(seeds)
    lines = ["", f"Rows rerun at {n_seeds - 1} more seeds (best dev accuracy %; seed 0 from the table above), "
             "reports `bench/results/quality_sst2_seed*.json` (the same command with `--seed N --rows ...`):", "",
             "| method | implementation | virtual tokens | LR | " + " | ".join(f"seed {i}" for i in range(n_seeds))
             + " | mean |", "|---|---|---|---|" + "---|" * (n_seeds + 1)]
    for name in names:
        runs = _runs(name, ok, seeds)
        r = runs[0]
        cells = [_acc(x["best_dev_accuracy"]) for x in runs] + ["-"] * (n_seeds - len(runs))
        lines.append(f"| {r['label']} | {r['implementation']} | {r['num_virtual_tokens'] or '-'} | "
                     f"{_lr(r.get('encoder_lr') or r.get('prompt_lr'))} | " + " | ".join(cells)
                     + f" | {_acc(_mean(runs, 'best_dev_accuracy'))} |")
    return lines


def targets(ok: dict, seeds: list[dict] = ()) -> list[str]:
    """Met / not met per target, on the mean over the seeds each row ran at (best dev accuracy)."""
    seeds = list(seeds)
    out = []

    def best_of(impl: str, method: str) -> str | None:
        names = [n for n, r in ok.items() if r["implementation"] == impl and r["method"] == method]
        return max(names, key=lambda n: ok[n]["best_dev_accuracy"]) if names else None

    v2, ft = best_of("softprompt", "p-tuning-v2"), best_of("baseline", "full-fine-tuning")
    if v2 and ft:
        v2_runs, ft_runs = _runs(v2, ok, seeds), _runs(ft, ok, seeds)
        gap = 100 * (_mean(ft_runs, "best_dev_accuracy") - _mean(v2_runs, "best_dev_accuracy"))
        verdict = "**met**" if gap <= 1.0 else "**not met**"
        out.append(f"- P-tuning v2 within 1.0 point of full fine-tuning (each at its best setting on seed 0, then "
                   f"averaged over {len(v2_runs)} / {len(ft_runs)} seeds): {verdict}. P-tuning v2 "
                   f"{_spread(v2_runs)} (LR {_lr(ok[v2]['prompt_lr'])}, {ok[v2]['num_virtual_tokens']} virtual "
                   f"tokens), full fine-tuning {_spread(ft_runs)} (LR {_lr(ok[ft]['encoder_lr'])}): a gap of "
                   f"{gap:+.2f} points. The gap at every setting tried is in the table: more steps, learning rates "
                   "and prompt lengths did not close it on this 22M-parameter encoder (P-tuning v2's parity with "
                   "fine-tuning was reported for models of 330M parameters and more).")
    else:
        out.append("- P-tuning v2 within 1.0 point of full fine-tuning: not measured (a row is missing or failed).")
    verdicts = []
    details = []
    for mine, theirs in PAIRS:
        a_runs, b_runs = _runs(mine, ok, seeds), _runs(theirs, ok, seeds)
        if not a_runs or not b_runs:
            details.append(f"  - {ROWS[mine]['label']}: not measured (`{mine if not a_runs else theirs}` "
                           "missing or failed)")
            verdicts.append(None)
            continue
        a, b = _mean(a_runs, "best_dev_accuracy"), _mean(b_runs, "best_dev_accuracy")
        met = a >= b
        verdicts.append(met)
        details.append(f"  - {ROWS[mine]['label']}: {'met' if met else '**not met**'}: ours {_spread(a_runs)}, "
                       f"PEFT {_spread(b_runs)}: {100 * (a - b):+.2f} points (final step, mean: ours "
                       f"{_acc(_mean(a_runs, 'final_dev_accuracy'))}, PEFT {_acc(_mean(b_runs, 'final_dev_accuracy'))})")
    if all(v is True for v in verdicts):
        overall = "**met** for every method"
    elif any(v is False for v in verdicts):
        missed = [ROWS[o]["label"] for (o, _), v in zip(PAIRS, verdicts) if v is False]
        overall = "**not met** for " + ", ".join(missed)
    else:
        overall = "not fully measured"
    n = max((len(_runs(m, ok, seeds)) for m, _ in PAIRS), default=1)
    out.append(f"- Each of our methods at least as accurate as PEFT's same method (best dev accuracy, mean over "
               f"{n} seeds): {overall}. Per pair (mean, then each seed):")
    out += details
    return out


def main() -> None:
    parser = run_parser(__doc__, OUT, steps=2000, batch_size=32, eval_every=250)
    parser.add_argument("--rows", nargs="+", default=RUN_ORDER, choices=list(ROWS), metavar="ROW",
                        help="rows to run (default: all): " + " ".join(RUN_ORDER))
    args = parser.parse_args()
    from softprompt.data import load_recipe

    recipe = load_recipe("sst2", args.data_root)
    header = {"benchmark": "SST-2 dev accuracy, all-MiniLM-L6-v2", "device": device_name(), "settings": run_settings(args),
              "versions": versions(), "command": run_command("bench.quality.sst2", args, subset("--rows", args.rows, RUN_ORDER)), "data": recipe.notes or "SST-2",
              "dev_size": len(recipe.examples("dev")),
              "parallel": f"{args.jobs} rows ran at a time." if args.jobs > 1 else ""}
    report = start_report(Path(args.out), header, list(args.rows))

    def done(row: dict) -> str:
        return (f"best {row['best_dev_accuracy']:.4f} (step {row['best_step']}), final {row['final_dev_accuracy']:.4f}, "
                f"{row['trainable_params']:,} params")

    run_rows(run_row, list(args.rows), args, report, Path(args.out), jobs=args.jobs, on_row=done)


if __name__ == "__main__":
    main()
