"""Serving throughput: softprompt's mixed-task batches against HF PEFT switching adapters,
on a randomly initialised model of a real shape (speed does not depend on the weights).

    python -m bench.serve.throughput --shape llama-1b --out bench/results/serve_throughput.json
    python -m bench.serve.throughput --shape tiny      # a smoke run on the CPU

Scenarios (ours and PEFT's in one process, same requests, bf16 on a GPU):
  S3  prompt K/V caching: 100 virtual tokens before 32-token inputs, forward (answer slot
      read); cached leading segment vs recomputing it every request (with --compile: also
      through the engine's compiled head forward). Share of the bf16 peak: the forward's
      FLOPs (`forward_flops`) per second.
  S2  mixed-task classification: 512 requests over 16 and over 256 tasks (prompt tuning,
      20 virtual tokens, 64-token inputs), the label read at the answer slot; ours: the
      engine's mixed batches; PEFT: one forward per task group after `set_adapter`; share of
      the bf16 peak: every request's 84 tokens' FLOPs per second (cached rows compute fewer).
  S1  mixed-task generation: 64 requests over 16 tasks, 64-token inputs, 32 new tokens
      (greedy); ours: the engine's decode loop on fixed slots with the step replayed as a
      CUDA graph (and eagerly, and `generate_mixed`); PEFT: `generate` per task group; and
      one plain `generate` batch of the base model (no prompts) for reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.harness.hardware import bandwidth, forward_flops, peak_tflops
from bench.harness.report import RESULTS, rerun_command, versions, write_json
from bench.harness.shapes import SHAPES, build_base, tokenizer
from bench.harness.timing import interleaved, measure


def text_of(n: int) -> str:
    return " hello" * n  # n tokens of GPT-2's BPE


def timed(fn, repeats: int) -> float:
    """Seconds per call: one warm-up call, then the mean of `repeats`."""
    return measure(fn, warmup=1, calls=repeats).seconds


def bank_of(base, tok, n_tasks: int, template: str, cache: bool):
    import softprompt as sp
    from softprompt.serve import PromptBank

    bank = PromptBank(base, tok, cache_prompts=cache)
    for t in range(n_tasks):
        torch.manual_seed(t)
        model = sp.SoftPromptModel(base, sp.PromptTuningConfig(template=template, init="random"), tokenizer=tok)
        bank.add(f"t{t}", model)
    return bank


# -- S3 -------------------------------------------------------------------------------
def s3(base, tok, args) -> dict:
    from softprompt.serve import encode_mixed, forward_mixed
    from softprompt.serve.compiled import CompiledForward
    from softprompt.serve.graphed import HeadGraphs
    from softprompt.serve.mixed import head_forward

    template = "[P:100] {text} [MASK]"
    out: dict = {"virtual_tokens": 100, "input_tokens": 32}
    banks = {cache: bank_of(base, tok, 1, template, cache) for cache in (False, True)}
    forwards: dict = {"": None}  # suffix -> the compiled head forward (None: eager)
    if args.compile:  # the engine's head forward, `Engine(compile=True)`
        forwards["_compiled"] = CompiledForward(head_forward, True, "head forward")
    # the engine's head graphs (`Engine(head_graphs=...)`, on by default on a GPU): the
    # batch padded to a bucket and replayed, recording the forward above (one set per bank)
    graphed = {suffix: {cache: HeadGraphs(bank, capture=torch.cuda.is_available(), max_tokens=args.s3_graph_tokens)
                        for cache, bank in banks.items()} for suffix in list(forwards)}
    for suffix, compiled in list(forwards.items()):
        for graphs in graphed[suffix].values():
            graphs.forward = compiled
    for rows in args.s3_rows:
        names = ["t0"] * rows
        examples = [{"text": text_of(31)} for _ in range(rows)]  # 31 + the answer token = 32 input tokens
        part: dict = {"rows": rows}
        for suffix in [*forwards, *(s + "_graphs" for s in forwards)]:
            compiled = forwards[suffix.removesuffix("_graphs")]
            for cache, bank in banks.items():
                batch = encode_mixed(bank, names, examples)
                if suffix.endswith("_graphs"):
                    graphs = graphed[suffix.removesuffix("_graphs")][cache]
                    if not graphs.takes(batch, logits="answer"):
                        continue
                    run = lambda: graphs(batch, logits="answer")  # noqa: E731
                elif compiled is None:
                    run = lambda: forward_mixed(bank, batch, logits="answer")  # noqa: E731
                else:
                    run = lambda: compiled.run(lambda fn: forward_mixed(bank, batch, logits="answer",  # noqa: E731
                                                                        base_forward=fn))
                seconds = timed(run, args.repeats)
                tokens = int(batch["attention_mask"][0].sum())
                part[("cached" if cache else "recomputed") + suffix] = {
                    "seconds_per_batch": seconds, "rows_per_s": rows / seconds, "row_tokens": tokens,
                    "share_of_peak": share_of_peak(base, rows, tokens, 100 if cache else 0, seconds)}
            if "cached" + suffix in part and "recomputed" + suffix in part:
                part["speedup" + suffix] = part["cached" + suffix]["rows_per_s"] / part["recomputed" + suffix]["rows_per_s"]
        out[f"batch_{rows}"] = part
    return out


def share_of_peak(base, rows: int, tokens: int, prefix: int, seconds: float) -> float | None:
    """The forward's FLOPs (`forward_flops`, the LM head at one column) per second over the
    GPU's dense bf16 peak (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    return forward_flops(base, rows, tokens, prefix) / seconds / (peak_tflops(torch.cuda.get_device_name(0)) * 1e12)


# -- S2 -------------------------------------------------------------------------------
P_S2 = 20  # S2's virtual tokens


def s2(base, tok, args, n_tasks: int) -> dict:
    from softprompt.serve import Engine, Request

    n_requests, P = 512, P_S2
    text = text_of(63)  # + the answer token: 64 input tokens
    tasks = [f"t{i % n_tasks}" for i in range(n_requests)]
    out: dict = {"tasks": n_tasks, "requests": n_requests, "virtual_tokens": P, "input_tokens": 64,
                 "max_batch_rows": args.s2_rows}
    for cache in (False, True):
        progress(f"S2 {n_tasks} tasks, cache={cache}: building the bank")
        bank = bank_of(base, tok, n_tasks, f"[P:{P}] {{text}} [MASK]", cache)
        progress(f"S2 {n_tasks} tasks, cache={cache}: running")
        engine = Engine(bank, max_batch_rows=args.s2_rows, max_batch_tokens=args.s2_rows * 128, compile=args.compile)
        requests = [Request(t, text, generate=False) for t in tasks]
        for e in bank.entries(bank.names()):  # answer logits are what a verbalizer reads: a head-less probe
            e.task = _answer_probe()
        failed = [r.error for r in engine.run(requests) if not r.ok]
        if failed:  # a timing of failed requests measures nothing
            raise RuntimeError(f"S2: {len(failed)} of {len(requests)} requests failed, e.g. {failed[0]}")
        seconds = timed(lambda: engine.run(requests), args.repeats)
        out["softprompt_cached" if cache else "softprompt"] = {
            "seconds": seconds, "requests_per_s": n_requests / seconds,
            # the model's FLOPs for the work (every request's 20 + 64 tokens), cached or not
            "share_of_peak": share_of_peak(base, n_requests, P + 64, 0, seconds)}
    seconds = peft_s2(base, tok, tasks, text, args.s2_rows, args.repeats)
    progress(f"S2 {n_tasks} tasks: PEFT timed")
    out["peft"] = {"seconds": seconds, "requests_per_s": n_requests / seconds}
    out["speedup"] = out["softprompt"]["requests_per_s"] / out["peft"]["requests_per_s"]
    out["speedup_cached"] = out["softprompt_cached"]["requests_per_s"] / out["peft"]["requests_per_s"]
    return out


def peft_s2(base, tok, tasks: list[str], text: str, rows: int, repeats: int) -> float:
    """HF PEFT on S2's requests (task `tasks[i]` for request i, all of text `text`): one
    prompt-tuning adapter per task, one batch of at most `rows` per task group after
    `set_adapter`, the answer slot's arg-max read. Seconds per pass over the requests."""
    from peft import PeftModel

    peft_model = peft_adapters(base, len(set(tasks)), P_S2)
    groups: dict[str, int] = {}
    for t in tasks:
        groups[t] = groups.get(t, 0) + 1

    @torch.no_grad()
    def peft_run():
        for name, count in groups.items():
            peft_model.set_adapter(name)
            for start in range(0, count, rows):
                n = min(rows, count - start)
                enc = tok([text] * n, return_tensors="pt").to(base.device)
                logits = peft_model(**enc).logits[:, -1]  # the answer slot
                logits.argmax(-1).tolist()

    seconds = timed(peft_run, repeats)
    _unwrap(peft_model)
    assert not isinstance(base, PeftModel)
    return seconds


def peft_adapters(base, n_tasks: int, P: int):
    """A PEFT model with one prompt-tuning adapter per task, ``t0`` ... (switched with set_adapter)."""
    from peft import PromptTuningConfig, get_peft_model

    model = None
    for t in range(n_tasks):
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"t{t}")
        else:
            model.add_adapter(f"t{t}", config)
    return model.eval()


def progress(message: str) -> None:
    """Where a long run is (stderr, unbuffered: a run cut off by a time limit still says)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _answer_probe():
    """A task that reads the answer slot's arg-max token: the work of a single-token verbalizer."""
    from softprompt.tasks.base import Task

    class AnswerProbe(Task):
        kind = "verbalizer"
        reads = {"logits": "answer"}

        def annotate(self, batch, examples):
            pass

        def predict(self, model, batch, out=None):
            return out.answer_logits.argmax(-1).tolist()

    return AnswerProbe()


def _unwrap(peft_model) -> None:
    """Take PEFT's wrappers off the shared base so the next scenario sees it bare."""
    try:
        peft_model.unload()
    except AttributeError:  # prompt-learning models have no unload: nothing was injected
        pass


# -- S1 -------------------------------------------------------------------------------
def add_tasks(bank, base, tok, n: int, P: int) -> None:
    """Input tasks ``t0`` ... and P-tuning v2 (deep) tasks ``d0`` ... up to `n` of each."""
    import softprompt as sp

    for i in range(n):
        torch.manual_seed(1000 + i)
        for name, config in ((f"t{i}", sp.PromptTuningConfig(template=f"[P:{P}] {{text}}", init="random")),
                             (f"d{i}", sp.PTuningV2Config(template="{text}", num_virtual_tokens=P))):
            if name not in bank.names():
                bank.add(name, sp.SoftPromptModel(base, config, tokenizer=tok))


def served_bank(shape: str, tasks: int, benchmark: str, module: str, argv: list[str], settings: dict):
    """The serving probes' set-up: shape `shape` on the GPU (the CPU: a smoke run), a bank of
    `tasks` input and deep tasks (`add_tasks`, 20 virtual tokens, prompts cached), and the
    report's header. Returns (device, bank, report)."""
    from softprompt.serve import PromptBank

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build_base(shape, device)
    tok = tokenizer()
    bank = PromptBank(base, tok, cache_prompts=True)
    add_tasks(bank, base, tok, tasks, 20)
    report = {"benchmark": benchmark, "shape": shape,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "versions": versions(),
              "command": rerun_command(module, argv), "settings": settings, "results": []}
    return device, bank, report


def mix(value: str) -> tuple[str, int]:
    kind, _, n = value.partition(":")
    if kind not in ("input", "deep") or not n.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: want input:N or deep:N")
    return kind, int(n)


def s1(base, tok, args) -> dict:
    from softprompt.serve import encode_mixed, generate_mixed

    n_requests, n_tasks, P, new = 64, 16, 20, 32
    text = text_of(64)
    tasks = [f"t{i % n_tasks}" for i in range(n_requests)]
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    out: dict = {"requests": n_requests, "tasks": n_tasks, "input_tokens": 64, "new_tokens": new}
    bank = bank_of(base, tok, n_tasks, f"[P:{P}] {{text}}", cache=True)
    batch = encode_mixed(bank, tasks, [{"text": text}] * n_requests)
    seconds = timed(lambda: generate_mixed(bank, batch, **options), args.gen_repeats)
    out["softprompt_generate"] = {"seconds": seconds, "new_tokens_per_s": n_requests * new / seconds}
    from softprompt.serve.decode import Decoder, DecodeRow, Sampling

    def decoder_run(decoder, names=tasks):  # the engine's path: continuous batching (no end-of-sequence stop: exactly `new` tokens)
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=new)) for t in names]
        decoder.run(rows)
        return [r.tokens for r in rows]

    siblings = args.compile and args.sibling_products  # Q/K/V and gate/up as one product each (compiled step)
    graphed = Decoder(bank, max_rows=n_requests, compile=args.compile, sibling_products=siblings)  # kept, as the engine keeps it: the graph is captured once
    eager = Decoder(bank, max_rows=n_requests, graphs=False)
    # the engine's decoder with every join prefilled unpadded (no prefill graphs): what they
    # gain (uncompiled runs only: compiled, its prefill would compile minutes of versions)
    unpadded = None if args.compile else Decoder(bank, max_rows=n_requests, padded_prefill=False)
    bank.add_base("base")  # the same engine on the same requests with no prompt: what prompts cost
    mixes = {"input:16": tasks, "none": ["base"] * n_requests}
    if args.s1_mixes:  # input and deep prompts, few and many tasks, on the same decoder
        add_tasks(bank, base, tok, max(n for _, n in args.s1_mixes), P)
        for kind, n in args.s1_mixes:
            mixes[f"{kind}:{n}"] = [("d" if kind == "deep" else "t") + str(i % n) for i in range(n_requests)]
    runs = {name: (lambda names=names: decoder_run(graphed, names)) for name, names in mixes.items()}
    # the same with each task's prefix (cached segment, deep prompt) stored once in the
    # prefix pool (`prefix_pool.py`, opt-in) instead of copied into each row's columns
    pooled = Decoder(bank, max_rows=n_requests, compile=args.compile, shared_prefix=True, sibling_products=siblings)
    pool_mixes = [m for m in ("input:16", "deep:16") if m in mixes]
    for name in pool_mixes:
        runs[f"{name} prefix pool"] = lambda names=mixes[name]: decoder_run(pooled, names)
    if unpadded is not None:
        runs["input:16 unpadded prefill"] = lambda: decoder_run(unpadded)
    seconds = interleaved(runs, max(args.gen_repeats, 7))
    if unpadded is not None:
        unpadded_s = seconds.pop("input:16 unpadded prefill")
        out["softprompt_unpadded_prefill"] = {"seconds": unpadded_s, "new_tokens_per_s": n_requests * new / unpadded_s}
    out["prefix_pool"] = {}
    for name in pool_mixes:
        pool_s = seconds.pop(f"{name} prefix pool")
        out["prefix_pool"][name] = {"seconds": pool_s, "new_tokens_per_s": n_requests * new / pool_s}
    rate = {name: n_requests * new / s for name, s in seconds.items()}
    out["softprompt"] = {"seconds": seconds["input:16"], "new_tokens_per_s": rate["input:16"],
                         "cuda_graph": graphed.slots is not None and graphed.slots._graph is not None}
    out["softprompt_no_prompts"] = {"seconds": seconds["none"], "new_tokens_per_s": rate["none"]}
    out["prompted_over_no_prompts"] = rate["input:16"] / rate["none"]
    out["prompt_mixes"] = {name: {"seconds": seconds[name], "new_tokens_per_s": rate[name],
                                  "over_no_prompts": rate[name] / rate["none"]} for name in mixes if name != "none"}
    seconds = timed(lambda: decoder_run(eager), args.gen_repeats)
    out["softprompt_eager_step"] = {"seconds": seconds, "new_tokens_per_s": n_requests * new / seconds}
    # the replayed graph computes what the eager step computes (same slots, same kernels)
    graph_tokens = decoder_run(graphed)
    same = sum(a == b for a, b in zip(graph_tokens, decoder_run(eager)))
    out["graph_rows_equal_eager"] = f"{same}/{n_requests}"
    same = sum(a == b for a, b in zip(graph_tokens, decoder_run(pooled)))  # bf16: one softmax over two parts
    out["prefix_pool_rows_equal_copies"] = f"{same}/{n_requests}"
    if unpadded is not None:  # bf16: padded shapes may round differently
        same = sum(a == b for a, b in zip(graph_tokens, decoder_run(unpadded)))
        out["padded_prefill_rows_equal_unpadded"] = f"{same}/{n_requests}"
    out["sibling_products"] = bool(siblings)
    out["prefill_graphs"] = len(graphed.prefill.graphs) if graphed.prefill.graphs is not None else 0
    if args.compile:  # compiled, other kernels round differently: graph == the same compiled step run eagerly
        compiled_eager = Decoder(bank, max_rows=n_requests, graphs=True, compile=True,  # fixed slots
                                 sibling_products=siblings)
        decoder_run(compiled_eager, tasks[:1])  # makes its slots
        compiled_eager.slots.graphs = False
        same = sum(a == b for a, b in zip(graph_tokens, decoder_run(compiled_eager)))
        out["graph_rows_equal_compiled_eager"] = f"{same}/{n_requests}"
        del compiled_eager
    slots = graphed.slots  # one decode step alone (all 64 slots), without the host loop around it
    for name, use_graph in (("graph", True), ("eager", False)) if slots is not None else ():
        slots.reset()
        slots.graphs = use_graph and slots._graph is not None
        out[f"decode_step_ms_{name}"] = 1000 * timed(slots.step, 20)
    if slots is not None:
        slots.reset()
        slots.graphs = slots._graph is not None
    enc = tok([text] * n_requests, return_tensors="pt").to(base.device)
    seconds = timed(lambda: base.generate(**enc, **options), args.gen_repeats)
    out["plain_generate"] = {"seconds": seconds, "new_tokens_per_s": n_requests * new / seconds}
    peft_model = peft_adapters(base, n_tasks, P)
    per_task = n_requests // n_tasks
    enc_group = tok([text] * per_task, return_tensors="pt").to(base.device)

    @torch.no_grad()
    def peft_run():
        for t in range(n_tasks):
            peft_model.set_adapter(f"t{t}")
            peft_model.generate(**enc_group, **options)

    seconds = timed(peft_run, args.gen_repeats)
    out["peft"] = {"seconds": seconds, "new_tokens_per_s": n_requests * new / seconds}
    out["speedup"] = out["softprompt"]["new_tokens_per_s"] / out["peft"]["new_tokens_per_s"]
    out["plain_over_peft"] = out["plain_generate"]["new_tokens_per_s"] / out["peft"]["new_tokens_per_s"]
    n_params = sum(p.numel() for p in base.parameters())
    if torch.cuda.is_available():
        bound = bandwidth() / (n_params * base.dtype.itemsize) * n_requests  # weights read once per decode step
        out["bandwidth_bound_new_tokens_per_s"] = bound
    _unwrap(peft_model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--scenarios", nargs="+", default=["s1", "s3", "s2"], choices=["s1", "s2", "s3"])
    parser.add_argument("--s2-rows", type=int, default=128,
                        help="S2: most rows per batch (both; PEFT's batches are its task groups, 32 or 2 rows)")
    parser.add_argument("--s3-rows", type=int, nargs="+", default=[64, 256], help="S3's batch sizes")
    parser.add_argument("--s3-graph-tokens", type=int, default=16384,
                        help="S3's head graphs: most padded tokens a graphed batch holds (the engine's: 8,192)")
    parser.add_argument("--compile", action="store_true",
                        help="the engine's forwards compiled (S1: the decode step before capture and the prefill; "
                             "S2, S3: the head forward, also timed uncompiled in S3)")
    parser.add_argument("--sibling-products", action="store_true",
                        help="with --compile: S1's compiled step runs each layer's Q/K/V and gate/up as one product "
                             "(`softprompt.serve.sibling_products`)")
    parser.add_argument("--s1-mixes", type=mix, nargs="*", default=[],
                        help="S1: also time these task mixes on the same decoder, e.g. input:16 input:256 deep:16 "
                             "deep:256 (input: prompt tuning; deep: P-tuning v2; 20 virtual tokens each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "serve_throughput.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    report = {"benchmark": "serving throughput", "shape": args.shape, "config": SHAPES[args.shape].config,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})",
              "dtype": str(dtype), "versions": versions(),
              "command": rerun_command("bench.serve.throughput", sys.argv[1:]), "results": {}}
    out = Path(args.out)
    tok = tokenizer()
    base = build_base(args.shape, device, dtype)
    for name in args.scenarios:
        start = time.perf_counter()
        try:
            if name == "s2":
                result = {f"{n}_tasks": s2(base, tok, args, n) for n in (16, 256)}
            else:
                result = {"s1": s1, "s3": s3}[name](base, tok, args)
        except Exception as e:  # a failing scenario is reported, not fatal
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        report["results"][name] = result
        write_json(report, out)
        print(name, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
