"""docs/PERFORMANCE.md's sections on training's fast path: compilation chosen by default,
the LM loss without the whole logits and its kernels, padding-free packing (each rendered
from its report in bench/results/; `bench.render.performance` puts them in the page)."""

from __future__ import annotations

from bench.harness.hardware import peak_tflops
from bench.harness.report import load_report


def compile_auto() -> list[str]:
    """`softprompt train` end to end with ``train.compile=auto`` (the default) against eager,
    at two run lengths (issue 24 item 1)."""
    report = load_report("train_cli_compile_auto_h100.json")
    if report is None:
        return []
    runs = {(r["steps"], r["compile"]): r for r in report["runs"]}
    # the 1B shape's parameter count, as the throughput report of the same shape records it
    N = next(r["params"] for r in (load_report("train_throughput.json") or {"rows": []})["rows"]
             if r.get("model") == "llama-1b" and r.get("params"))
    lines = ["## `train.compile=auto` end to end (issue 24 item 1)", "",
             f"{report['device']}; {report['model']}; {report['data']}. What the log says with auto: "
             f"\"{report['log_line']}\". Train seconds include the compilation (evaluation excluded).", "",
             f"Share of peak: tokens/s x 4N FLOPs (a frozen forward and the backward to the activations, N = "
             f"{N / 1e9:.3g}B from the throughput report of the same shape) over the card's dense bf16 peak "
             f"({peak_tflops(report['device']):,.0f} TFLOP/s): SST-2's rows are ~12 tokens, "
             "and steps of such short rows are far from it (the packing section below: the 1B frozen model's floor "
             "runs at a tenth of its 16 x 512 rate on them).", "",
             "| steps | compile | train s | tokens/s (whole run) | share of bf16 peak | held-out acc. | GLUE dev acc. |",
             "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        share = 100 * r["tokens_per_s"] * 4 * N / (peak_tflops(report["device"]) * 1e12)
        lines.append(f"| {r['steps']} | {r['compile']} | {r['train_seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{share:.2f}% | {r['held_out_accuracy']:.1%} | {r['reported_accuracy']:.1%} |")
    steps = sorted({r["steps"] for r in report["runs"]})
    if len(steps) == 2 and all((n, c) in runs for n in steps for c in ("auto", "false")):
        a, b = steps
        per_step = (runs[(b, "auto")]["train_seconds"] - runs[(a, "auto")]["train_seconds"]) / (b - a)
        fixed = runs[(a, "auto")]["train_seconds"] - a * per_step
        eager = (runs[(b, "false")]["train_seconds"] - runs[(a, "false")]["train_seconds"]) / (b - a)
        lines += ["", f"From the two lengths: a compiled step takes {1000 * per_step:.0f} ms against {1000 * eager:.0f} ms "
                  f"eager ({eager / per_step:.1f}x), and compiling (with the recompilation for a second row length) costs "
                  f"{fixed:.0f} s once, so auto pays from about {fixed / (eager - per_step):,.0f} steps on this model: "
                  f"slower at {a} steps ({runs[(a, 'auto')]['train_seconds']:.1f} s against "
                  f"{runs[(a, 'false')]['train_seconds']:.1f}), faster at {b} ({runs[(b, 'auto')]['train_seconds']:.1f} "
                  f"against {runs[(b, 'false')]['train_seconds']:.1f}). The accuracies are a random-init model's; compiled "
                  "and eager round differently in bf16, so the two runs part."]
    lines += ["", f"Rerun on a GPU: `{report['command']}`.", ""]
    return lines


def chunked_loss() -> list[str]:
    """A causal LM's loss without its (B, S, V) logits (issue 24 item 3): the same step with
    the chunked loss and with the whole logits, PEFT and the frozen model's floor beside."""
    report = load_report("train_lm_chunked.json")
    if report is None:
        return []
    lines = ["## LM loss without the whole logits (issue 24 item 3): `bench.train.throughput`", "",
             f"{report['device']}, 1B Llama shape (vocabulary 128,256), 16 x 512 tokens, next-token loss over every "
             "position, 20 virtual tokens, bf16 weights, eager, fused AdamW. `ours` computes the loss as generation "
             "training does (`loss.chunked_token_loss`: the LM head a chunk of target positions at a time, each "
             "chunk's gradient taken at once); `whole-logits`: the same step over the whole (B, S, V) logits, as "
             "before. Floor: the frozen model's forward and backward to its input embeddings with the whole logits. The "
             "bound: 4N FLOPs a token (a frozen forward and the backward to the activations, N = 1.24B parameters) "
             "at the card's dense bf16 peak.",
             "", "| side | method | variant | tokens/s | % of bf16 peak (4N FLOPs a token) | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        share = f"{r['pct_peak_4N']:.1f}%" if r.get("pct_peak_4N") is not None else "-"
        lines.append(f"| {r['side']} | {r.get('method') or '-'} | {r['variant']} | {r['tokens_per_s']:,.0f} | {share} | "
                     f"{r['peak_gib']:.1f} |")
    rows = {(r["side"], r.get("method"), r["variant"]): r for r in report["rows"]}
    notes = []
    for m in ("prompt_tuning", "p_tuning_v2"):
        a, b, peft = rows.get(("ours", m, "eager")), rows.get(("ours", m, "whole-logits")), rows.get(("peft", m, "eager"))
        if a and b and peft:
            notes.append(f"{m}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x the whole-logits step's tokens/s with "
                         f"{1 - a['peak_gib'] / b['peak_gib']:.0%} less peak memory; {a['tokens_per_s'] / peft['tokens_per_s']:.2f}x PEFT")
    lines += ["", "; ".join(notes) + ".", "",
              "Rerun on a GPU: `python -m bench.train.throughput --models llama-1b --shapes 16x512 --losses lm --methods "
              "prompt_tuning,p_tuning_v2 --sides floor,ours,peft --variants eager,whole-logits --peft-autocast off "
              "--out bench/results/train_lm_chunked.json`.", ""]
    return lines


def loss_kernels() -> list[str]:
    """The chunked LM loss against the fused kernels of liger-kernel and cut-cross-entropy on
    the same step (issue 24 item 3: measure and choose)."""
    report = load_report("train_lm_kernels_h100.json")
    if report is None:
        return []
    rows = {r["variant"]: r for r in report["rows"]}
    first = report["rows"][0]
    lines = [f"### Chunks, liger-kernel or cut-cross-entropy ({report['device']})", "",
             f"The same step ({first['model']}, {first['batch']} x {first['seq']}, prompt tuning, LM loss over every "
             "position, eager): the summed cross-entropy from the last states (`loss.summed_token_loss`) by "
             "softprompt's chunks, by liger-kernel's `LigerFusedLinearCrossEntropyLoss` and by cut-cross-entropy's "
             "`linear_cross_entropy`; the whole (B, S, V) logits beside. Share: 4N FLOPs a token at the card's dense "
             "bf16 peak.", "", "| loss | ms a step | tokens/s | vs chunks | % of bf16 peak | peak GiB |",
             "|---|---|---|---|---|---|"]
    names = {"eager": "chunks (softprompt)", "whole-logits": "whole logits", "liger": "liger-kernel 0.8.5",
             "cce": "cut-cross-entropy 25.1.1"}
    base = rows.get("eager")
    for variant, r in rows.items():
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"| {names.get(variant, variant)} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {vs} | "
                     f"{r['pct_peak_4N']:.1f}% | {r['peak_gib']:.1f} |")
    liger = rows.get("liger")
    saved = f"{1 - liger['peak_gib'] / base['peak_gib']:.0%}" if liger and base else "-"
    lines += ["", f"Both fused kernels beat the chunks, liger the most, with {saved} less peak memory (the logits never "
              "exist whole in any of the three). The choice is liger-kernel for causal LMs on a GPU: "
              "`train.lm_loss=auto` (the default) picks it on a CUDA device where the `liger` extra is installed "
              "(`pip install 'softprompt[liger]'`), else the chunks, said in one log line; its loss and every "
              "trainable parameter's gradient equal the chunks' on an H100 for prompt tuning, P-tuning, prefix "
              "tuning and P-tuning v2, with the base in fp32, fp32 under bf16 autocast and bf16 "
              "(`tests/test_loss_kernels.py`, 12 of 12).", "",
              "Rerun on a GPU: `python -m bench.train.throughput --models llama-1b --shapes 16x512 --losses lm --methods "
              "prompt_tuning --sides ours --variants chunks,whole-logits,liger,cce --out "
              "bench/results/train_lm_kernels_h100.json`.", ""]
    sizes = load_report("train_lm_kernels_sizes_h100.json")
    if sizes is None:
        return lines
    peak = peak_tflops(sizes["device"]) * 1e12
    lines += [f"#### At three sizes ({sizes['device']}): chunks against liger, 16 x 512, LM loss, eager", "",
              "| model | method | chunks tokens/s | liger tokens/s | liger / chunks | share of bf16 peak (4N), chunks / liger "
              "| peak GiB chunks / liger |", "|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["method"], r["variant"]): r for r in sizes["rows"]}
    for (model, method, variant), chunks in by.items():
        liger = by.get((model, method, "liger"))
        if variant != "chunks" or liger is None:
            continue
        share = lambda r: f"{100 * r['tokens_per_s'] * 4 * r['params'] / peak:.1f}%"  # noqa: E731
        lines.append(f"| {model} | {method} | {chunks['tokens_per_s']:,.0f} | {liger['tokens_per_s']:,.0f} | "
                     f"{liger['tokens_per_s'] / chunks['tokens_per_s']:.2f}x | {share(chunks)} / {share(liger)} | "
                     f"{chunks['peak_gib']:.2f} / {liger['peak_gib']:.2f} |")
    lines += ["", "The gain shrinks with the model: the LM head's share of a step is largest at GPT-2's 124M "
              "parameters (a 50,257-word vocabulary over a 768-wide state) and smallest at 8B.", "",
              f"Rerun on a GPU: `{sizes['command']}`.", ""]
    return lines


def liger_chunks() -> list[str]:
    """liger-kernel's chunks sized for a frozen head (`loss.liger_chunk_budget`) against
    liger's own sizes, where measured (`bench.train.throughput --variants liger,liger-own-chunks`)."""
    lines = ["#### liger's chunks for a frozen head", "",
             "liger sizes a chunk of its fused loss like the states (`chunk_mem_const=1`), the right size for a head "
             "that trains; a soft prompt's head is frozen and read twice per chunk (scores, then the states' "
             "gradient). The H100 profile of the packed instruct mix below ran 47 chunks of 64 positions: 16.7 ms a "
             "step reading the 525 MB head 94 times. Since f0ddc8b softprompt asks liger for chunks of about "
             "`LOSS_CHUNK_SCORES` scores (at most twice that): 3 chunks of 1,024 positions there, 8 at 1B 16 x 512 "
             "(32 before); the profiles and rows above ran liger's own sizes.", ""]
    report = load_report("train_liger_chunks_h100.json")
    if report is None:
        return lines + ["Not measured on a GPU yet. Rerun: `python -m bench.train.throughput --models llama-1b "
                        "--shapes 16x512 --losses lm --sides ours --methods prompt_tuning --variants "
                        "liger,liger-own-chunks,chunks --out bench/results/train_liger_chunks_h100.json`.", ""]
    names = {"liger": "liger, softprompt's chunk sizes", "liger-own-chunks": "liger, its own chunk sizes",
             "chunks": "softprompt's chunks"}
    lines += [f"{report['device']}; share: 4N FLOPs a token at the card's dense bf16 peak:", "",
              "| loss | model | B x S | ms a step | tokens/s | % of bf16 peak | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {names.get(r['variant'], r['variant'])} | {r['model']} | {r['batch']} x {r['seq']} | "
                         f"failed: {r['error'][:100]} | - | - | - |")
            continue
        lines.append(f"| {names.get(r['variant'], r['variant'])} | {r['model']} | {r['batch']} x {r['seq']} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['pct_peak_4N']:.1f}% | {r['peak_gib']:.1f} |")
    by = {r["variant"]: r for r in report["rows"] if not r.get("error")}
    ours, own = by.get("liger"), by.get("liger-own-chunks")
    if ours and own:
        lines += ["", f"softprompt's chunk sizes save {own['ms_per_step'] - ours['ms_per_step']:.1f} ms a step "
                  f"({ours['tokens_per_s'] / own['tokens_per_s']:.3f}x tokens/s) for "
                  f"{ours['peak_gib'] - own['peak_gib']:+.2f} GiB of peak memory. The bound on the saving: 48 fewer reads "
                  "of the 525 MB head (32 chunks -> 8, two reads each), 25 GB, 7.5 ms at the H100's 3.35 TB/s; about "
                  "half of it was measured. The packed instruct mix (47 chunks -> 3) is not measured yet."]
    return lines + ["", "Rerun on a GPU: `python -m bench.train.throughput --models llama-1b --shapes 16x512 --losses lm "
                    "--sides ours --methods prompt_tuning --variants liger,liger-own-chunks,chunks --out "
                    "bench/results/train_liger_chunks_h100.json`.", ""]


def packing() -> list[str]:
    """Padding-free packing on a real length mix (issue 24 item 2): the padded step against
    the packed one, the frozen model's floor beside (`bench.train.throughput --mix`)."""
    report = load_report("train_packed_sst2_h100.json")
    if report is None:
        return []
    # the models' parameter counts: the packing report's rows were kept as printed, without them; the
    # throughput report of the same shapes records them
    params = {r["model"]: r["params"] for r in (load_report("train_throughput.json") or {"rows": []})["rows"]
                      if r.get("params") and r["model"] in {x["model"] for x in report["rows"]}}
    lines = ["## Padding-free packing on SST-2's lengths (issue 24 item 2): `bench.train.throughput --mix sst2`", "",
             f"{report['device']}, {report['note']}.", "",
             "Share of peak: real tokens/s x 4N FLOPs (a frozen forward and the backward to the activations; N = "
             f"{', '.join(f'{m} {n / 1e9:.3g}B' for m, n in params.items())}) over the card's dense bf16 peak "
             f"({peak_tflops(report['device']):,.0f} TFLOP/s).", "",
             "| model | side | method | padded tokens/s | packed tokens/s | packed / padded | share of bf16 peak, padded / "
             "packed | peak GiB padded / packed |", "|---|---|---|---|---|---|---|---|"]
    peak = peak_tflops(report["device"]) * 1e12

    def share(r):
        return f"{100 * r['tokens_per_s'] * 4 * params[r['model']] / peak:.1f}%"
    by = {(r["model"], r["side"], r.get("method"), r["variant"]): r for r in report["rows"]}
    for (model, side, method, variant), padded in by.items():
        packed = by.get((model, side, method, "packed"))
        if variant != "eager" or packed is None:
            continue
        lines.append(f"| {model} | {side} | {method or '-'} | {padded['tokens_per_s']:,.0f} | {packed['tokens_per_s']:,.0f} | "
                     f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x | {share(padded)} / {share(packed)} | "
                     f"{padded['peak_gib']:.2f} / {packed['peak_gib']:.2f} |")
    lines += ["", "At 32 rows of 12 tokens on average a step is a few hundred real tokens: these steps are bound by "
              "the host launching kernels, not by the padding (the 1B floor runs at 5,800 tokens/s here against "
              "58,000 at 16 x 512), so packing saves memory more than time.", "",
              f"Rerun on a GPU: `{report['command']}`.", ""]
    return lines + packing_instruct()


def packing_instruct() -> list[str]:
    """Packing on the instruction-like mix (20-1,000 tokens), every variant and PEFT beside."""
    report = load_report("train_packed_instruct_h100.json")
    if report is None:
        return []
    peak = peak_tflops(report["device"]) * 1e12
    first = report["rows"][0]
    lines = [f"### The instruction-like mix ({report['device']}; `--mix instruct`)", "",
             f"{report['note']}: {first['real_tokens']:,} real tokens a step, {first['padded_tokens']:,} padded. "
             "tokens/s counts real tokens; share: real tokens/s x 4N over the dense bf16 peak; PEFT eager without "
             "autocast (its base in bf16).", "",
             "| side | method | eager | compile | packed | packed + compile | peak GiB eager / packed |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["side"], r.get("method"), r["variant"]): r for r in report["rows"]}
    cell = lambda r: "-" if r is None else f"{r['tokens_per_s']:,.0f} ({100 * r['tokens_per_s'] * 4 * r['params'] / peak:.1f}%)"  # noqa: E731
    for side, method in dict.fromkeys((k[0], k[1]) for k in by):
        got = {v: by.get((side, method, v)) for v in ("eager", "compile", "packed", "packed-compile")}
        memory = " / ".join(f"{got[v]['peak_gib']:.1f}" for v in ("eager", "packed") if got[v])
        lines.append(f"| {side} | {method or '-'} | " + " | ".join(cell(got[v]) for v in got) + f" | {memory} |")
    ours = {m: max((by[k] for k in by if k[0] == "ours" and k[1] == m), key=lambda r: r["tokens_per_s"])
            for m in {k[1] for k in by if k[0] == "ours"}}
    versus = ", ".join(f"{m} {r['tokens_per_s'] / by['peft', m, 'eager']['tokens_per_s']:.2f}x ({r['variant']})"
                       for m, r in sorted(ours.items()) if ("peft", m, "eager") in by)
    saved = [1 - by[k[:2] + ("packed",)]["peak_gib"] / r["peak_gib"] for k, r in by.items()
             if k[0] == "ours" and k[2] == "eager" and k[:2] + ("packed",) in by]
    floor = by.get(("floor", None, "packed")), by.get(("floor", None, "eager"))
    floor_ratio = f"{floor[0]['tokens_per_s'] / floor[1]['tokens_per_s']:.2f}x" if all(floor) else "-"
    lines += ["", f"Packing saves memory here too ({min(saved):.0%}-{max(saved):.0%} of ours' peak) but no time: the "
              f"packed floor runs at {floor_ratio} the padded floor's rate although its rows hold "
              f"{first['real_tokens'] / first['padded_tokens']:.0%} of the "
              "padded batch's tokens (the profile below says why). "
              "Ours' best against PEFT eager: "
              f"{versus}: the target (>= 1.5x PEFT's best on the real mixes) is **not met**; a step of "
              f"{first['real_tokens']:,} real tokens on a 1B model is again far from the GPU's peak.", "",
              f"Rerun on a GPU: `{report['command']}`.", ""]
    return lines + packing_profile(report)


def packing_profile(throughput: dict) -> list[str]:
    """Where a step's time goes on the instruction-like mix, padded against packed (the
    CUDA profiler over 5 steps: `bench.probe.profile_train_step`)."""
    report = load_report("train_profile_packed_instruct_h100.json")
    if report is None:
        return []
    rows = report["rows"]
    lines = [f"Where the step's time goes ({report['device']}, {report['model']}, {report['shape']} of the "
             f"`{report['mix']}` mix packed into sequences of at most {report['pack_tokens']:,} tokens, "
             f"{report['attention'].upper()} attention, LM loss; the CUDA profiler over 5 steps; its wall times "
             "include the profiler's own cost per operator):", "",
             "| row | wall ms (profiled) | GPU busy ms | kernels a step | attention ms (share of GPU time) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("error"):
            continue
        lines.append(f"| {name} | {r['wall_ms']:.1f} | {r['gpu_busy_ms']:.1f} | {r['kernels_per_step']:,} | "
                     f"{r['attention_ms']:.1f} ({r['attention_share']:.0%}) |")
    padded, packed = rows.get("floor padded"), rows.get("floor packed")
    speed = {r["variant"]: r for r in throughput["rows"] if r["side"] == "floor"}
    if padded and packed and "eager" in speed:
        step_ms = 1e3 * report["real_tokens"] / speed["eager"]["tokens_per_s"]
        lines += ["", f"Packing does cut the GPU's work: the packed floor keeps the GPU busy "
                  f"{packed['gpu_busy_ms']:.1f} ms a step against {padded['gpu_busy_ms']:.1f} padded "
                  f"({packed['gpu_busy_ms'] / padded['gpu_busy_ms']:.0%}), and attention is "
                  f"{packed['attention_share']:.0%} of it, not the masked all-pairs cost suspected before. "
                  f"But an eager step takes {step_ms:.0f} ms unprofiled (the throughput table's floor), "
                  f"about the padded step's GPU time: the eager step is bound by the host launching its "
                  f"~{packed['kernels_per_step']:,} kernels, so the GPU time packing saves shows only in a step that "
                  "is compiled or captured (the packed + compile column; its rows of varying length recompile or "
                  "fall back, which the table does not separate)."]
    lines += ["", f"Rerun on a GPU: `{report.get('command', 'python -m bench.probe.profile_train_step')}`.", ""]
    return lines


__all__ = ["compile_auto", "chunked_loss", "loss_kernels", "packing"]
