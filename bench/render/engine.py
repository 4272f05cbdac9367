"""The decode-engine part of docs/PERFORMANCE.md (issue 19), from the reports of
`bench.probe.decode_step` (decode_step_*.json, decode_step_autotune_h100.json), `bench.probe.decode_attention`
(decode_attention_*.json) and S1 of `bench.serve.throughput` (serve_s1_*.json): every
figure is read from them, none typed here.
"""

from __future__ import annotations

from bench.harness.hardware import bandwidth
from bench.harness.report import load_report
from bench.probe.lm_head_view import VOCAB, WIDTH

STEP_REPORTS = ("decode_step_gpu.json", "decode_step_h100.json")  # in the order the table shows them
S1_REPORTS = {  # report file -> what the run was
    "serve_s1_gpu_before.json": "main before this work", "serve_s1_gpu_new.json": "compiled step, SDPA attention",
              "serve_s1_h100.json": "compiled step, `packed_products` attention",
              "serve_s1_h100_compiled_prefill.json": "compiled step and prefill (commit 72e0a40: prefill's LM head on "
                                                     "the strided last column)",
              "serve_s1_h100_strided_head.json": "uncompiled step; prefill's LM head on the strided last column (before)",
              "serve_s1_h100_index_head.json": "uncompiled step; prefill's LM head on a contiguous last column",
              "serve_s1_h100_prefill_graphs.json": "uncompiled step; short joins replayed from prefill graphs",
              "serve_s1_h100_prefix_pool.json": "uncompiled step; each task's prefix stored once in the prefix pool "
                                                "(`Decoder(shared_prefix=True)`, opt-in)",
              "serve_s1_h100_compiled_prefill_graphs.json": "compiled step; the compiled prefill recorded in prefill "
                                                            "graphs (the slower-host H100: PEFT and `generate()` ran "
                                                            "at half their speed on the other machine)"}
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
        if s.get("prefix_copies"):  # the same requests with each row's prefix copied into its slot, same run
            what += "; prefixes copied per row instead, same run: " + ", ".join(
                f"{m} {c['new_tokens_per_s']:,.0f}" for m, c in s["prefix_copies"].items()) + " new tok/s"
        if s.get("prefix_pool"):  # the same requests with each task's prefix in the prefix pool, same run
            what += "; prefixes in the prefix pool instead, same run: " + ", ".join(
                f"{m} {c['new_tokens_per_s']:,.0f}" for m, c in s["prefix_pool"].items()) + " new tok/s"
        if "softprompt_unpadded_prefill" in s:  # the same decoder with every join prefilled unpadded, same run
            what += (f"; every join unpadded, same run: {s['softprompt_unpadded_prefill']['new_tokens_per_s']:,.0f} "
                     f"new tok/s, rows equal {s['padded_prefill_rows_equal_unpadded']}")
        lines.append(
            f"| {_gpu(report)} | {what} (`{report['command']}`) | {s['softprompt']['new_tokens_per_s']:,.0f} "
            f"| {f'{none:,.0f}' if none else '-'} | {ratio} "
            f"| {s['peft']['new_tokens_per_s']:,.0f} | {s['plain_generate']['new_tokens_per_s']:,.0f} | {s['speedup']:.1f}x "
            f"| {s['bandwidth_bound_new_tokens_per_s']:,.0f} ({s['softprompt']['new_tokens_per_s'] / s['bandwidth_bound_new_tokens_per_s']:.0%}) "
            f"| {s.get('decode_step_ms_graph', float('nan')):.2f} | {same} |")
        if len(s.get("prompt_mixes", {})) > len((mixes or ({}, {}))[1].get("prompt_mixes", {})):
            mixes = (report, s)  # the run with the most mixes
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


def fused_products_note() -> str:
    """What concatenating the projections that read one input would gain, measured alone
    (`bench.probe.fused_products`): the weights' products of every layer and the LM head."""
    report = load_report("fused_products_h100.json")
    if report is None:
        return ""
    by = {(r["rows"], r["products"]): r for r in report["results"]}
    rows = sorted({r for r, _ in by})
    both = [r for r in rows if (r, "separate") in by and (r, "fused") in by]
    parts = [f"{r} rows {by[r, 'separate']['ms']:.2f} -> {by[r, 'fused']['ms']:.2f} ms "
             f"({by[r, 'separate']['share_of_bound']:.0%} -> {by[r, 'fused']['share_of_bound']:.0%} of the "
             "weight-read bound)" for r in both]
    saved = [by[r, "separate"]["ms"] - by[r, "fused"]["ms"] for r in both]
    return ("; measured alone on an H100 (`python -m bench.probe.fused_products`: every layer's products and the LM "
            "head of the 1B shape in one CUDA graph, bf16, the same results to the bit), Q/K/V and gate/up concatenated "
            "would take " + ", ".join(parts) + f": {' to '.join(dict.fromkeys(f'{x:.2f}' for x in (min(saved), max(saved))))} ms of the step, not the 2x the step is "
            "from its target")


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
                    "one for gate and up is built (`Decoder(sibling_products=True)`, `serve/sibling_products.py`: "
                    "the siblings' weights laid side by side in one buffer, same values and memory, and fused by an "
                    "inductor pass under freezing; probe variants `slot+compile+siblings`, "
                    "`slot+compile+copies+siblings`) but not yet measured on a GPU" + fused_products_note())
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


PREFILL_REPORTS = {  # report file -> what the code was
    "prefill_h100_before.json": "commit 72e0a40: the LM head on the strided last column; duck shaping on",
    "prefill_h100.json": "the LM head on a contiguous last column; duck shaping off",
    "prefill_graphs_h100.json": "short joins padded to buckets and replayed from CUDA graphs (uncompiled)",
    "prefill_graphs_compiled_h100.json": "the compiled forward recorded in the graphs; another H100 machine, whose host "
                                         "was slower: its eager 1x64 took 22.4 ms against 12.6 ms in the run above"}


PREFILL_LEGEND = (
    "A join: R rows of T input tokens, each with its task's prompt (input: 20 virtual tokens cached as a K/V "
    "segment; deep: P-tuning v2's 20-position prefix). Variants: eager (transformers' forward); compile "
    "(`torch.compile`, dynamic shapes); graphs (padded to a bucket of rows and length, replayed from a CUDA "
    "graph: `serve/graphed.py`; joins over 8,192 padded tokens run eagerly); graphs+compile (the compiled "
    "forward recorded in those graphs). prefill: build, forward, first tokens (synced); join: the prefill "
    "and placing the rows in the slots; bound: the larger of the join's FLOPs at the dense bf16 peak and "
    "its weight bytes at the memory bandwidth; first s: the first join of that shape (the compile or the "
    "capture it waits for).")


def prefill_tables() -> list[str]:
    tables = [line for name, what in PREFILL_REPORTS.items() for line in prefill_table(name, what) + [""]]
    return (["### Prefill of joining rows", "", PREFILL_LEGEND, ""] + tables + lm_head_note()) if tables else []


def lm_head_note() -> list[str]:
    """The prefill's LM head over a strided view against a contiguous column (`bench.probe.lm_head_view`)."""
    view = load_report("lm_head_view_h100.json")
    before, after = (load_report(n) for n in ("serve_s1_h100_strided_head.json", "serve_s1_h100_index_head.json"))
    if view is None:
        return []
    a = view["settings"]
    bound_ms = 1e3 * VOCAB * WIDTH * 2 / bandwidth(view["device"])
    text = (f"The prefill's LM head at the last column ({_gpu(view)}, `{view['command']}`): {a['rows']} rows of "
            f"{a['columns']} columns, as transformers slices an int `logits_to_keep` (`hidden[:, -1:]`, rows a whole "
            f"sequence apart), took {view['view_ms']:.2f} ms in one skinny-tile cuBLAS kernel; over a contiguous "
            f"copy (an index, `inject.last_columns`) {view['index_ms']:.2f} ms. Bound: the head's "
            f"{VOCAB} x {WIDTH} bf16 weights read once at the bandwidth, {bound_ms:.3f} ms "
            f"({bound_ms / view['view_ms']:.1%} of it reached before, {bound_ms / view['index_ms']:.0%} after)")
    if before and after:
        b, n = before["results"]["s1"], after["results"]["s1"]
        text += (f". S1 with the uncompiled step, that change alone: {b['softprompt']['new_tokens_per_s']:,.0f} -> "
                 f"{n['softprompt']['new_tokens_per_s']:,.0f} new tok/s ({b['softprompt']['seconds'] * 1e3:.1f} -> "
                 f"{n['softprompt']['seconds'] * 1e3:.1f} ms a run)")
    return [text + ".", ""]


def prefill_table(name: str, what: str) -> list[str]:
    """Joins by variant: eager, compiled, graphed, graphed and compiled (`bench.probe.prefill`)."""
    report = load_report(name)
    if report is None:
        return []
    lines = [f"#### {_gpu(report)}: {what} (rerun: `{report['command']}`)", "",

             "| join (kind RxT) | variant | prefill ms | join ms | host build ms | GPU ms (kernels) | bound ms (share) "
             "| first s | first tokens == eager |", "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted((r for r in report["results"] if "prefill_ms" in r),
                  key=lambda r: (r["kind"], r["rows"], r["input_tokens"]))
    for r in rows:
        bound = r["bound"]["bound_ms"]
        gpu = (r.get("profile") or {}).get("gpu_us_per_step")
        lines.append(f"| {r['kind']} {r['rows']}x{r['input_tokens']} | {r['variant']} | {r['prefill_ms']:.1f} "
                     f"| {r['join_ms']:.1f} | {r['build_ms']:.1f} | {f'{gpu / 1e3:.1f}' if gpu else '-'} "
                     f"| {bound:.2f} ({bound / r['prefill_ms']:.0%}) | {r.get('compile_s', '-')} "
                     f"| {r.get('first_tokens_equal_eager', '-')} |")
    return lines


def burst_table() -> list[str]:
    """Running rows under a burst of joins, by join budget (`bench.probe.burst`)."""
    report = load_report("burst_h100.json")
    if report is None:
        return []
    a = report["settings"]
    lines = [f"### A burst of joins while rows decode ({_gpu(report)}; rerun: `{report['command']}`)", "",
             f"{a['rows']} rows decode ({a['new']} new tokens each); once each has made {a['after']}, {a['burst']} rows "
             f"of {a['burst_tokens']} input tokens arrive at once. stall: the longest gap between two tokens of a "
             "running row while the burst joins; step gap: the median gap between two tokens.", "",
             "| join budget (max_join_tokens) | stall ms | step gap ms | burst first token ms (median / max) "
             "| new tok/s over the run | rows == unbudgeted run |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        budget = f"{r['max_join_tokens']:,}" if r["max_join_tokens"] else "none (all at once)"
        lines.append(f"| {budget} | {r['stall_ms']:.1f} | {r['step_gap_ms']:.2f} | {r['burst_first_ms']['median']:.1f} / "
                     f"{r['burst_first_ms']['max']:.1f} | {r['new_tokens_per_s']:,.0f} | {r['rows_equal_unbudgeted']} |")
    lines += ["", "A budget changes which rows prefill together and when the slots' columns grow, so bfloat16 "
              "kernels sum in another order; on a random-init model, whose next-token scores are nearly tied, greedy "
              "paths then part (the rows that differ). In float32 on the CPU every row equals the row run alone under "
              "a budget (`test_a_join_budget_lets_running_rows_step_between_groups`). The engine's budget is "
              "`--max-batch-tokens` (16,384 by default: a burst this size splits in two)."]
    return lines


def prefix_pool_table() -> list[str]:
    """The compiled decode step with each task's prefix once in the pool against a copy in
    every row (`bench.probe.decode_step --variants slot+compile slot+compile+copies`)."""
    report = load_report("decode_step_pool_compiled_h100.json")
    if report is None:
        return []
    c = report["settings"]
    by = {(r["variant"], r["rows"]): r for r in report["results"]}
    N = c["tasks"] * c["virtual"]
    lines = [f"### Each task's prefix once in the prefix pool, against a copy in each row ({_gpu(report)}; rerun: "
             f"`python -m bench.probe.decode_step --variants {' '.join(c['variants'])} --virtual {c['virtual']} "
             f"--tasks {c['tasks']}`)", "",
             f"The compiled step replayed as a CUDA graph; {c['tasks']} tasks' input prompts of {c['virtual']} virtual "
             f"tokens, cached as K/V segments ({N:,} pool columns), {c['input_tokens']}-token inputs.", "",
             "| rows | pool step ms | copies step ms | pool / copies | S1-style run new tok/s, pool / copies "
             "| greedy tokens equal (copies vs pool) |", "|---|---|---|---|---|---|"]
    for rows in c["rows"]:
        pool, copies = by.get(("slot+compile", rows)), by.get(("slot+compile+copies", rows))
        if pool is None or copies is None:
            continue
        lines.append(f"| {rows} | {pool['step_ms']:.2f} | {copies['step_ms']:.2f} | {pool['step_ms'] / copies['step_ms']:.2f}x "
                     f"| {pool['run']['new_tokens_per_s']:,.0f} / {copies['run']['new_tokens_per_s']:,.0f} "
                     f"| {copies.get('rows_equal_pool_variant')} |")
    lines += ["", f"Why the pool is slower: `attention.pooled_products` scores every row against every pool column, "
              f"a float32 (R, H_kv, G, N) tensor with N the pool's columns (at least the {N:,} held): at 256 rows at "
              "least 52 MB per layer, 0.84 GB a step, written and read again by the softmax, where the copies read "
              f"each row's own {c['virtual']} columns. What would reach it: "
              "each task's rows attending to their own span only (cascade attention: FlashInfer's shared-prefix "
              "kernels, or `flex_attention` with a block mask of the rows' spans), merged with the slot columns' part "
              "by log-sum-exp. Until then the pool stays opt-in (`Decoder(shared_prefix=True)`). Greedy tokens: "
              "bfloat16 sums in another order (one softmax over pool and slot columns against one over the row's "
              "columns), so on a random-init model paths may part; in float32 on the CPU every row equals the row "
              "alone (`tests/test_serve_prefix_pool.py`)."]
    cascade = load_report("decode_step_pool_cascade_h100.json")
    if cascade is not None:
        r = cascade["results"][0]
        flex = sum(k["us_per_step"] for k in r["profile"]["top"] if "flex_attention" in k["kernel"])
        lines += ["", f"The cascade form, measured ({_gpu(cascade)}, branch `cascade-flex`, not on main): the pool's part "
                  "as one compiled `flex_attention` kernel over a block mask of the rows' spans, merged with the slot "
                  "columns' part by log-sum-exp. It lowers once the mask's query block is one block of next_pow2(R x G) "
                  "rows (what inductor's flex decoding kernel takes under 128 rows) and equals `pooled_products` on the "
                  f"GPU (fp32 and bf16, 64 and 200 rows), but the {r['rows']}-row step took {r['step_ms']:.2f} ms, "
                  f"{flex / 1000:.2f} ms of it in the flex kernels ({flex / 16:.0f} us a layer): its block lists hold every "
                  "pool block for every row (rows of all tasks share a query block, so no block can be skipped) and "
                  "the mask is evaluated per element. What would reach the copies' time: rows grouped by task in "
                  "the slots (query blocks of one task, each with its span's blocks only), or FlashInfer's cascade "
                  "kernels, which take per-row page tables."]
    return lines


def s2_table() -> list[str]:
    """S2 as model FLOP utilisation (`bench.serve.throughput --scenarios s2`)."""
    report = load_report("serve_s2_h100.json")
    if report is None:
        return []
    lines = [f"### S2 mixed-task classification as a share of the GPU's peak ({_gpu(report)}; rerun: "
             f"`{report['command']}`)", "",
             "512 requests of 20 virtual + 64 input tokens through `Engine.run` (template encoding, batching, the "
             "forward reading the answer slot), batches of up to 128 rows; share of peak: the model's FLOPs for every "
             "request's 84 tokens per second over the dense bf16 peak; PEFT: one batch per task group after "
             "`set_adapter`, same process.", "",
             "| tasks | ours, prompts recomputed | ours, prompt K/V cached (the bank's default) | PEFT | cached / PEFT "
             "| target (16 tasks) |", "|---|---|---|---|---|---|"]
    for key, r in sorted(report["results"]["s2"].items(), key=lambda kv: kv[1]["tasks"] if isinstance(kv[1], dict) else 0):
        if not isinstance(r, dict):
            continue
        ours, cached = r["softprompt"], r["softprompt_cached"]
        target = ">= 60% of peak: **not met**" if r["tasks"] == 16 and cached["share_of_peak"] < 0.6 else "-"
        lines.append(f"| {r['tasks']} | {ours['requests_per_s']:,.0f} req/s ({ours['share_of_peak']:.0%}) "
                     f"| {cached['requests_per_s']:,.0f} req/s ({cached['share_of_peak']:.0%}) "
                     f"| {r['peft']['requests_per_s']:,.0f} req/s | {r['speedup_cached']:.2f}x | {target} |")
    return lines


def bank_levels_table() -> list[str]:
    """Start-up and first reads of the bank's folder level (`bench.probe.bank_levels`)."""
    report = load_report("bank_levels_cpu.json")
    if report is None:
        return []
    r = report["results"]
    lazy, eager = r["registered"], r["read_at_startup"]
    return [f"### Thousands of tasks: folders registered, read on first request ({report['device']}; rerun: "
            f"`{report['command']}`)", "",
            f"{report['tasks']:,} prompt folders (P-tuning v2, 20 virtual tokens, `{report['model']}`):", "",
            "| bank | start-up s | per task ms | first request of one task ms | folders read |", "|---|---|---|---|---|",
            f"| every folder read at start-up | {eager['startup_s']:.2f} | {eager['startup_ms_per_task']:.2f} "
            f"| {eager['first_lookup_ms']:.2f} | {eager['folders_read']:,} |",
            f"| registered (`serve --lazy`) | {lazy['startup_s']:.2f} | {lazy['startup_ms_per_task']:.3f} "
            f"| {lazy['first_lookup_ms']:.1f} (its folder read) | {lazy['folders_read']:,} |", "",
            f"A task dropped by the host-memory cap (`--max-in-memory`) is read again in "
            f"{r['read_again_after_eviction_ms']:.1f} ms; host memory to the GPU: below."]


HEADS_REPORTS = {  # report file -> what the engine was
    "heads_h200_before.json": "before the pipelining (commit e2494fc)",
    "heads_gpu.json": "pipelined (commit 92d685d), against one batch after another in the same run"}
TASK_COUNT_REPORTS = {  # report file -> the bank's device level in that run
    "task_count_gpu.json": "before: each row scanned every task for the least recently used",
    "task_count_lru_gpu.json": "after: an O(1) least-recently-used order (one round)"}


def heads_table() -> list[str]:
    """Where S2's time goes, before and after the head batches were pipelined
    (`bench.probe.heads`)."""
    reports = {name: r for name in HEADS_REPORTS if (r := load_report(name)) is not None}
    if not reports:
        return []
    report = reports["heads_gpu.json"] if "heads_gpu.json" in reports else next(iter(reports.values()))
    lines = [f"### S2: where a head batch's time goes (rerun: `{report['command']}`)", "",
             "S2's 512 requests (16 tasks' input prompts, 20 virtual tokens cached, 64-token inputs, the answer "
             "slot read) through `Engine.run`. pipelined: each batch's forward queued before the answers of the "
             "batch before are read (graphed batches replay on their own stream); one after another: the engine "
             "before that change, same run, same graphs. prepare: checking and encoding the requests on the host; "
             "GPU: kernel time of one run (CUDA profiler); idle: wall - prepare - GPU. Share of peak: the FLOPs of "
             "every request's 84 tokens per wall second (per GPU second) over the dense bf16 peak. Compare rows of "
             "one GPU only.", "",
             "| GPU | engine | variant | wall ms | one after another ms | answers equal | req/s | prepare ms | GPU ms "
             "| idle ms | share of peak (of GPU time) | matrix products / elementwise / copies / attention ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        for r in rep["results"]:
            head = f"| {_gpu(rep)} | {HEADS_REPORTS[name]} | {r['variant']} "
            if "error" in r:
                lines.append(head + f"| error: {r['error']} |" + " |" * 8)
                continue
            groups = r.get("kernels", {}).get("groups_us", {})
            kernels = " / ".join(f"{groups.get(g, 0) / 1e3:.1f}" for g in ("matrix products", "elementwise", "copies",
                                                                             "attention"))
            share = (f"{r['share_of_peak']:.0%} ({r['gpu_share_of_peak']:.0%})" if r.get("share_of_peak") is not None
                     else "-")
            after = f"{r['one_after_another_ms']:.1f}" if "one_after_another_ms" in r else "-"
            gpu = f"{r['gpu_ms']:.1f}" if r.get("gpu_ms") is not None else "-"
            idle = f"{r['idle_ms']:.1f}" if r.get("idle_ms") is not None else "-"
            lines.append(head + f"| {r['wall_ms']:.1f} | {after} | {r.get('answers_equal_one_after_another', '-')} "
                         f"| {r['requests_per_s']:,.0f} | {r['prepare_ms']:.1f} | {gpu} | {idle} | {share} | {kernels} |")
    peft = report.get("peft")
    if peft:
        lines += ["", f"HF PEFT on the same requests, in the {_gpu(report)} run: {peft['requests_per_s']:,.0f} req/s."]
    shares = [r for r in report["results"] if r.get("share_of_peak") is not None and "no prompts" not in r["variant"]]
    if shares:
        best = max(shares, key=lambda r: r["share_of_peak"])
        verdict = "met" if best["share_of_peak"] >= 0.6 else "**not met**"
        lines += ["", f"Target (16 tasks): >= 60% of peak; best {best['share_of_peak']:.0%} ({best['variant']}): "
                  f"{verdict}. Idle may come out slightly below 0: a batch's reading kernels run beside the next "
                  "batch's forward, so kernel times overlap."]
    return lines


def task_count_table() -> list[str]:
    """Throughput from 1 to 2,000 distinct tasks and a cold prompt's move to the GPU
    (`bench.probe.task_count`)."""
    reports = {name: r for name in TASK_COUNT_REPORTS if (r := load_report(name)) is not None}
    if not reports:
        return []
    report = next(iter(reports.values()))
    settings = report["settings"]
    lines = [f"### From 1 to {max(settings['tasks']):,} tasks in one run ({_gpu(report)}; rerun: "
             f"`{report['command']}`)", "",
             f"{settings['requests']:,} requests ({settings['new']} new tokens each, 64-token inputs) through the "
             f"engine's decoder ({settings['rows']} slots, continuous batching, the step replayed from a CUDA graph); "
             "request i uses task i mod T, so every group of joining rows holds min(T, 64) distinct tasks; input: "
             "prompt tuning (20 virtual tokens, cached K/V), deep: P-tuning v2 (20 virtual tokens). of fewest "
             "tasks: against the same kind's run with the fewest tasks of the same run (target: within 10%). With "
             "the device level capped (`max_on_device=256`), 2,000 tasks cycle through 256 places: every joining "
             "row's prompt comes over from host memory.", "",
             "| run | mix | device level | new tok/s | of no prompts | of fewest tasks / of all on device "
             "| of the bandwidth bound |", "|---|---|---|---|---|---|---|"]
    # the bound: every weight read once per decode step of 64 rows, on this GPU and shape (S1's report records it)
    s1 = (load_report("serve_s1_h100.json") or {}).get("results", {}).get("s1", {})
    bound = s1.get("bandwidth_bound_new_tokens_per_s") if settings["rows"] == s1.get("requests") else None
    for name, r in reports.items():
        for row in r["results"]:
            ratio = row.get("of_fewest_tasks", row.get("of_all_on_device"))
            one_count = len(r["settings"]["tasks"]) == 1 and "of_fewest_tasks" in row  # nothing to compare with
            of_none = f"{row['of_no_prompts']:.1%}" if "of_no_prompts" in row else "-"
            share = f"{row['new_tokens_per_s'] / bound:.0%}" if bound else "-"
            lines.append(f"| {TASK_COUNT_REPORTS[name]} | {row['mix']} | {row['device_level']} "
                         f"| {row['new_tokens_per_s']:,.0f} | {of_none} | {'-' if one_count else f'{ratio:.1%}'} "
                         f"| {share} |")
    if bound:
        lines += ["", f"Bandwidth bound: every weight read once per decode step of {settings['rows']} rows, "
                  f"{bound:,.0f} new tok/s on this GPU (as in the S1 table). The runs include each row's prefill "
                  "and the host loop; where the step's time goes is in the decode-step table above."]
    cold = report.get("cold_load_ms")
    if cold:
        lines += ["", "A cold prompt from host memory to the GPU (`PromptBank._device_tensor`, synchronised; median of "
                  "50 tasks; target < 10 ms): " + ", ".join(f"{k} {v:.3f} ms" for k, v in cold.items()) + "."]
    return lines


S3_VARIANTS = (("", "eager"), ("_graphs", "padded, CUDA graphs"), ("_compiled", "compiled"),
               ("_compiled_graphs", "padded, CUDA graphs of the compiled forward"))


def s3_compiled_table() -> list[str]:
    """S3 through the engine's head forwards: eager, compiled, and padded to a bucket and
    replayed from CUDA graphs (`graphed.HeadGraphs`) of either
    (`bench.serve.throughput --scenarios s3 --compile`)."""
    reports = [r for r in (load_report("serve_s3_h100.json"), load_report("serve_s3_h100_eager_rows.json")) if r]
    if not reports:
        return []
    first = reports[0]["results"]["s3"]
    lines = [f"### S3 through the head forwards: eager, compiled, CUDA graphs ({_gpu(reports[0])})", "",
             f"{first['virtual_tokens']} virtual tokens cached (or recomputed) before {first['input_tokens']}-token "
             "inputs, one task; the forward reads the answer slot. padded, CUDA graphs: the batch padded to a bucket "
             "of rows and length (`serve/graphed.py`: `HeadGraphs`, the engine's default on a GPU) and replayed; "
             "recomputed rows of 131 tokens pad to 160 columns. vs fastest recomputed: the cached forward against "
             "the fastest recomputing forward of the same run (of any variant). Share of peak: the forward's FLOPs "
             "per second over the dense bf16 peak.", "",
             "| run | rows | forward | recomputed ms | cached ms | cached / recomputed, same forward "
             "| vs fastest recomputed (target >= 3x at 64 rows) | cached share of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        s3 = report["results"]["s3"]
        for part in sorted((v for k, v in s3.items() if k.startswith("batch_")), key=lambda r: r["rows"]):
            fastest = min(part[k]["seconds_per_batch"] for k in part if k.startswith("recomputed"))
            for suffix, what in S3_VARIANTS:
                if "cached" + suffix not in part:
                    continue
                c, r = part["cached" + suffix], part.get("recomputed" + suffix)
                share = c.get("share_of_peak")
                same = f"{part['speedup' + suffix]:.2f}x" if "speedup" + suffix in part else "-"
                recomputed = f"{r['seconds_per_batch'] * 1e3:.2f}" if r else "- (over the graphs' token budget)"
                lines.append(f"| `{report['command'].removeprefix('python -m bench.serve.throughput ')}` "
                             f"| {part['rows']} | {what} | {recomputed} | {c['seconds_per_batch'] * 1e3:.2f} | {same} "
                             f"| {fastest / c['seconds_per_batch']:.2f}x | {f'{share:.0%}' if share is not None else '-'} |")
    return lines


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
              "count under matrix products (its softmax under fused). The H200 `slot+compile+freezing` rows passed "
              "`{\"options\": {\"freezing\": True}}` to `torch.compile`, which never froze the weights (dynamo reads "
              "inductor's freezing flag when it traces, not from the options): they measured the plain compiled step "
              "again. The variants that freeze are `slot+compile+siblings` and `slot+compile+copies+siblings` "
              "(weights frozen, Q/K/V and gate/up fused)."]
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
    for section in (prefill_tables(), burst_table(), prefix_pool_table(), s3_compiled_table(), s2_table(),
                    heads_table(), bank_levels_table(), task_count_table()):
        if section:
            lines += section + [""]
    return lines
