"""Where echo scoring's time goes (issue 27 item 7): lm-eval's loglikelihood requests
through `Engine.run` in process, against the same rows' classification, on the served
folder of `bench.serve.random_served`.

    python -m bench.serve.random_served --shape llama-1b --out /tmp/served
    python -m bench.probe.scoring --served /tmp/served --out bench/results/scoring_probe.json

Per variant (one process, median of 3 runs after a warm-up): rows/s of ``classify``
(/v1/classify's path: the ``topic`` head) and ``score`` (echo + logprobs 1 + one new token,
``reader``), the same 64 documents (2-4 rows each, 64-256 tokens); for ``score`` also the
host time of turning its results into the API's ``logprobs`` and JSON (`echo_logprobs`,
``json.dumps``: what the server's event loop adds), a CUDA/CPU profile of one run (top
operators), and a Python profile of the engine thread's own work.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, rerun_command, versions, write_json
from bench.serve.scoring import documents, flops_per_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--served", required=True)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "scoring_probe.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.encode import TokenIds
    from softprompt.serve import Engine, PromptBank, Request
    from softprompt.serve.logprobs import echo_logprobs, token_texts

    cuda = torch.cuda.is_available()
    served = Path(args.served)
    tok = AutoTokenizer.from_pretrained(served / "model")
    base = AutoModelForCausalLM.from_pretrained(served / "model", dtype=torch.bfloat16 if cuda else torch.float32)
    base.to("cuda" if cuda else "cpu").eval()
    bank = PromptBank.from_directory(base, tok, served / "prompts")
    engine = Engine(bank)
    docs = documents(tok, args.documents)
    rows = [(ids, text) for d in docs for ids, text in zip(d["ids"], d["rows"])]
    options = {"max_new_tokens": 1, "temperature": 0, "logprobs": 1, "seed": 1234}
    kinds = {
        "classify": lambda: [Request("topic", text) for _, text in rows],
        "score": lambda: [Request("reader", TokenIds(ids), generate=True, options=dict(options), echo=True)
                          for ids, _ in rows],
    }
    token_texts(tok)
    flops = flops_per_row(str(served / "model"), docs)  # mean FLOPs of a row, each kind
    report = {"benchmark": "echo scoring vs classification in process", "command": rerun_command("bench.probe.scoring", sys.argv[1:]),
              "device": torch.cuda.get_device_name(0) if cuda else "CPU", "versions": versions(),
              "rows": len(rows), "tokens": sum(len(ids) for ids, _ in rows),
              "gflop_per_row": {k: flops[k] / 1e9 for k in ("score", "classify")}, "kinds": {}}

    def timed(make) -> tuple[float, list]:
        requests = make()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = engine.run(requests)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, results

    for name, make in kinds.items():
        timed(make)  # warm-up
        times, results = [], None
        for _ in range(3):
            t, results = timed(make)
            times.append(t)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        wall = sorted(times)[1]
        entry = {"wall_ms": 1000 * wall, "rows_per_s": len(rows) / wall,
                 "model_tflops": len(rows) * flops[name] / wall / 1e12}
        if name == "score":
            start = time.perf_counter()
            bodies = [echo_logprobs(tok, r.prompt_ids, r.prompt_logprobs, r.logprobs) for r in results]
            text = json.dumps(bodies, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            entry["api_host_ms"] = 1000 * (time.perf_counter() - start)
            entry["response_bytes"] = len(text)
            profiler = cProfile.Profile()
            profiler.enable()
            timed(make)
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(20)
            entry["python_profile"] = stream.getvalue().splitlines()[:45]
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            timed(make)
        key = "cuda_time_total" if cuda else "cpu_time_total"
        entry["top_ops"] = prof.key_averages().table(sort_by=key, row_limit=18).splitlines()
        report["kinds"][name] = entry
        print(name, {k: v for k, v in entry.items() if not isinstance(v, list)}, flush=True)
        write_json(report, Path(args.out))
    report["score_over_classify_rows"] = report["kinds"]["score"]["rows_per_s"] / report["kinds"]["classify"]["rows_per_s"]
    write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
