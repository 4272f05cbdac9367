"""The decode-engine part of docs/PERFORMANCE.md (issue 19), from the reports of
`bench.probe.decode_step` (decode_step_*.json, decode_step_autotune_h100.json), `bench.probe.decode_attention`
(decode_attention_*.json) and S1 of `bench.serve.throughput` (serve_s1_*.json): every
figure is read from them, none typed here.
"""

from __future__ import annotations

from bench.harness.report import load_report

STEP_REPORTS = ("decode_step_gpu.json", "decode_step_h100.json")  # in the order the table shows them
S1_REPORTS = {  # report file -> what the run was
    "serve_s1_gpu_before.json": "main before this work", "serve_s1_gpu_new.json": "compiled step, SDPA attention",
              "serve_s1_h100.json": "compiled step, `packed_products` attention"}
GROUPS = ["matrix products", "attention", "fused (triton)", "elementwise", "copies", "reductions", "other"]
TARGET_STEP_MS = {64: 0.95, 256: 1.6}  # issue 19, on an H200
TARGET_S1 = 35_000


def _gpu(report: dict) -> str:
    return report["device"].replace("NVIDIA ", "").replace(" 80GB HBM3", "")


def step_table() -> list[str]:
    lines = ["| GPU | variant | rows | step ms | new tok/s steady | weights bound ms (share) | weights + K/V bound ms (share) "
             "| kernels / step | " + " | ".join(f"{g} us" for g in GROUPS) + " | graph == eager (same code) |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(GROUPS) + "---|"]
    for name in STEP_REPORTS:
        report = load_report(name)
        for r in (report or {}).get("results", []):
            if "step_ms" not in r:
                continue
            b, p = r["bound"], r.get("profile", {})
            groups = p.get("groups_us", {})
            same = r.get("graph_vs_compiled_no_graph", {}).get("rows_equal")
            if same is None:  # reports without the compiled-eager comparison: against the uncompiled step
                same = r["graph_rows_equal_eager"] + (" (vs uncompiled)" if "compile" in r["variant"] else "")
            lines.append(
                f"| {_gpu(report)} | {r['variant']} | {r['rows']} | {r['step_ms']:.3f} | {r['rows'] / r['step_ms'] * 1e3:,.0f} "
                f"| {b['weights_ms']:.3f} ({b['weights_ms'] / r['step_ms']:.0%}) "
                f"| {b['weights_and_kv_ms']:.3f} ({b['weights_and_kv_ms'] / r['step_ms']:.0%}) "
                f"| {p.get('kernels_per_step', 0):.0f} | " + " | ".join(f"{groups.get(g, 0):.0f}" for g in GROUPS)
                + f" | {same} |")
    return lines


def compile_rounding() -> list[str]:
    """What compiling changes in the tokens, from the probe's three-way comparison."""
    report = load_report("decode_step_h100.json") or {}
    rows = [r for r in report.get("results", []) if r.get("variant") == "slot+compile" and "graph_vs_eager" in r]
    out = []
    for r in rows:
        ge, gc = r["graph_vs_eager"], r.get("graph_vs_compiled_no_graph", {})
        out.append(f"{r['rows']} rows: the graph equals the compiled step run without a graph for {gc.get('rows_equal')} "
                   f"rows (largest first-step score difference {gc.get('first_step_max_score_diff')}); against the "
                   f"uncompiled step, the first token is equal for {ge['first_token_equal']} rows, the scores differ by "
                   f"at most {ge['first_step_max_score_diff']} and {ge['rows_equal']} rows keep all 24 tokens equal")
    return out


def attention_table() -> list[str]:
    report = load_report("decode_attention_h100.json")
    if report is None:
        return ["(decode_attention report missing)"]
    lines = [f"Attention alone ({_gpu(report)}, `{report['command']}`): 16 layers' one-token queries (32 heads over 8 K/V "
             "heads, head dim 64) against each row's C slot columns, recorded as one CUDA graph; bound: the K/V bytes "
             "at the memory bandwidth; error: largest difference from a float32 reference.", "",
             "| rows x columns | bound ms | " + " | ".join(report["settings"]["candidates"]) + " |",
             "|---|---|" + "---|" * len(report["settings"]["candidates"])]
    cells: dict = {}
    for r in report["results"]:
        cells.setdefault((r["rows"], r["columns"]), {"bound": r["bound_ms"]})[r["candidate"]] = r
    for (rows, columns), row in cells.items():
        shown = []
        for c in report["settings"]["candidates"]:
            r = row.get(c, {})
            shown.append(f"{r['ms_16_layers']:.3f} ms ({r['share_of_bound']:.0%}, err {r['max_error']:.3f})"
                         if "ms_16_layers" in r else r.get("error", "-"))
        lines.append(f"| {rows} x {columns} | {row['bound']:.3f} | " + " | ".join(shown) + " |")
    return lines


def s1_table() -> list[str]:
    lines = ["| GPU | S1 run | ours new tok/s | no prompts | ours / no prompts | PEFT | plain `generate()` | ours / PEFT "
             "| bandwidth bound (share) | step ms (graph) | graph == eager |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    mixes = None
    for name, what in S1_REPORTS.items():
        report = load_report(name)
        if report is None:
            continue
        s = report["results"]["s1"]
        none = s.get("softprompt_no_prompts", {}).get("new_tokens_per_s")
        same = s["graph_rows_equal_eager"]
        if "graph_rows_equal_compiled_eager" in s:
            same = f"{s['graph_rows_equal_compiled_eager']} (compiled, run eagerly); {same} (uncompiled)"
        ratio = f"{s['prompted_over_no_prompts']:.1%}" if none else "-"
        lines.append(
            f"| {_gpu(report)} | {what} (`{report['command']}`) | {s['softprompt']['new_tokens_per_s']:,.0f} "
            f"| {f'{none:,.0f}' if none else '-'} | {ratio} "
            f"| {s['peft']['new_tokens_per_s']:,.0f} | {s['plain_generate']['new_tokens_per_s']:,.0f} | {s['speedup']:.1f}x "
            f"| {s['bandwidth_bound_new_tokens_per_s']:,.0f} ({s['softprompt']['new_tokens_per_s'] / s['bandwidth_bound_new_tokens_per_s']:.0%}) "
            f"| {s.get('decode_step_ms_graph', float('nan')):.2f} | {same} |")
        if s.get("prompt_mixes"):
            mixes = (report, s)
    if mixes:
        report, s = mixes
        lines += ["", f"Prompts against no prompts on one decoder ({_gpu(report)}, 64 requests, 64 input + 32 new tokens; "
                  "each mix the median of interleaved rounds; input: prompt tuning, deep: P-tuning v2, 20 virtual "
                  "tokens each):", "", "| mix (kind:tasks) | new tok/s | of no prompts (target >= 95%) |", "|---|---|---|",
                  f"| no prompts | {s['softprompt_no_prompts']['new_tokens_per_s']:,.0f} | 100% |"]
        for name, m in s["prompt_mixes"].items():
            lines.append(f"| {name} | {m['new_tokens_per_s']:,.0f} | {m['over_no_prompts']:.1%} |")
    return lines


def _steps() -> list[tuple[dict, dict]]:
    return [(report, r) for name in STEP_REPORTS if (report := load_report(name))
            for r in report["results"] if "step_ms" in r]


def targets() -> str:
    parts = []
    for rows, target in TARGET_STEP_MS.items():
        best = {}
        for report, r in _steps():
            if r["rows"] == rows and r["step_ms"] < best.get(_gpu(report), (1e9,))[0]:
                best[_gpu(report)] = (r["step_ms"], r["variant"])
        parts.append(f"{rows} rows: target <= {target} ms on an H200, best measured "
                     + ", ".join(f"{ms:.2f} ms on the {gpu} ({variant})" for gpu, (ms, variant) in best.items()))
    s1 = [(_gpu(rep), rep["results"]["s1"]["softprompt"]["new_tokens_per_s"]) for n in S1_REPORTS if (rep := load_report(n))]
    best_s1 = max(s1, key=lambda x: x[1]) if s1 else ("-", float("nan"))
    return ("Targets: " + "; ".join(parts) + f"; S1 >= {TARGET_S1:,} new tokens/s, best measured {best_s1[1]:,.0f} "
            f"({best_s1[0]}). **Not met.**")


def where_the_rest_goes() -> str:
    def h100(variant):
        return next((r for rep, r in _steps() if "H100" in rep["device"] and r["variant"] == variant and r["rows"] == 64),
                    None)

    compiled, weights_only = h100("slot+compile"), h100("slot+compile+sdpa")  # the latter: no products in attention
    tuned = load_report("decode_step_autotune_h100.json") or {"results": []}
    at = {r["variant"]: r for r in tuned["results"] if r["rows"] == 256 and "step_ms" in r}
    s1 = (load_report("serve_s1_h100.json") or {}).get("results", {}).get("s1", {})
    text = []
    if weights_only:
        mm = weights_only["profile"]["groups_us"].get("matrix products", 0) / 1e3
        text.append(f"the weights' matrix products are {mm:.2f} ms of the compiled 64-row step on the H100 (the "
                    "variant whose attention is no product), "
                    f"{mm / weights_only['bound']['weights_ms']:.1f}x the weight-read bound: the K and V projections "
                    "(2 MiB of weights each) and Q / O (8 MiB) are separate small products on the same input, far "
                    "from the bandwidth in cuBLAS (see the kernel table in the report); one product for Q, K, V and "
                    "one for gate and up would need the base model's weights concatenated (not done: the base stays "
                    "as loaded)")
    if "slot+autotune" in at and "slot+compile" in at:
        text.append(f"inductor's GEMM autotuning picked Triton kernels slower than cuBLAS "
                    f"({at['slot+autotune']['step_ms']:.2f} against {at['slot+compile']['step_ms']:.2f} ms a step at "
                    f"256 rows, after {at['slot+autotune']['capture_s']:.0f} s of tuning; "
                    "`bench/results/decode_step_autotune_h100.json`)")
    if compiled:
        run = compiled["run"]
        text.append(f"around the steps, a whole 64-row S1-style run takes {run['seconds'] * 1e3:.0f} ms: the eager "
                    f"prefill of the 64 joining rows {run['prefill_ms']:.0f} ms, {run['steps']} steps and "
                    f"{run['host_and_joins_ms']:.0f} ms of host loop and joins; so S1's rate is bound by the prefill "
                    "until it is captured in length buckets (item 4 of the issue)")
    if s1:
        text.append(f"S1 with the eager step is {s1['softprompt_eager_step']['new_tokens_per_s']:,.0f} new tok/s")
    return "Where the rest goes: " + "; ".join(text) + "."


def engine() -> list[str]:
    lines = ["## Decode engine (issue 19): `bench.probe.decode_step`, `bench.probe.decode_attention`, S1", "",
             "Model: a randomly initialised Llama of the `llama-1b` shape, bfloat16, 16 tasks' input prompts of 20 "
             "virtual tokens joined with 64-token inputs (84 columns used of 192 at the join). H200 and H100 rows come "
             "from different runs and machines: compare rows of one GPU only. Targets of the issue are for an H200.", "",
             "### One decode step (CUDA graph replay) and where its GPU time goes", "",
             "Rerun: `python -m bench.probe.decode_step --rows 64 256` (variants: `--variants transformers slot "
             "slot+compile slot+compile+sdpa`).", ""]
    lines += step_table()
    lines += ["", "Kernel groups are by kernel name: in the H100 `slot+compile` rows the attention's two batched products "
              "count under matrix products (its softmax under fused)."]
    lines += ["", targets(), ""]
    lines += ["Compiled against uncompiled: " + "; ".join(compile_rounding()) + ". The compiled code rounds "
              "differently in bfloat16 (fused norms, rotary and attention), by about one bfloat16 step of the "
              "logits; on a random-init model, whose next-token scores are nearly tied, greedy paths then part "
              "within 24 steps. The graph itself changes nothing: it equals the compiled step run eagerly, token for "
              "token. The engine's default stays uncompiled (`softprompt serve --compile` turns it on).", ""]
    lines += attention_table()
    lines += ["", "### S1 end to end (prefill, decode steps and the host loop)", ""]
    lines += s1_table()
    lines += ["", where_the_rest_goes(), ""]
    return lines
