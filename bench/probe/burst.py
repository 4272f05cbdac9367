"""A burst of long joins while rows decode: how long the running rows stall, with and
without the decoder's join budget (`Decoder(max_join_tokens=...)`; the engine passes its
``max_batch_tokens``).

    python -m bench.probe.burst --shape llama-1b --out bench/results/burst_h100.json

R rows of 16 tasks' input prompts (64 input tokens) decode; once each has made `--after`
tokens, B rows of T input tokens arrive at once (the admit hook, as the server's queue
hands them over). For each budget:

  stall_ms        the longest gap between two tokens of a running row while the burst joins
                  (a step alone is the gap when nothing joins: step_gap_ms, the median gap)
  burst_first_ms  the burst rows' time to their first token after they arrived (median, max)
  wall_s          the whole run; new_tokens_per_s over it

Every row's tokens are compared with the unbudgeted run's (greedy: a budget only changes
when rows join, never what they compute), reported as N/N.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.harness.report import RESULTS, write_json
from bench.harness.shapes import SHAPES
from bench.harness.timing import sync
from bench.serve.throughput import served_bank, text_of
from softprompt.serve.warmup import warm_decoder


def rows(bank, n: int, tasks: int, tokens: int, new: int, clock: dict, key: str):
    """n greedy rows of input tasks t0.. (`tokens` input tokens, `new` new), each noting the
    time of every token it receives in ``clock[(key, i)]``."""
    from softprompt.serve.decode import DecodeRow, Sampling

    out = []
    for i in range(n):
        entry = bank[f"t{i % tasks}"]
        example = {"text": text_of(tokens)}
        times = clock.setdefault((key, i), [])
        out.append(DecodeRow(entry.name, example, Sampling(max_new_tokens=new), entry=entry,
                             encoded=entry.model.encoder.encode(example),
                             on_token=lambda token, times=times: times.append(time.perf_counter())))
    return out


def run(decoder, bank, args) -> dict:
    """One run: the running rows, the burst joining once they have made `args.after` tokens."""
    clock: dict = {}
    running = rows(bank, args.rows, args.tasks, 64, args.new, clock, "run")
    burst = rows(bank, args.burst, args.tasks, args.burst_tokens, 16, clock, "burst")
    arrived: list[float] = []

    def admit(room: int):
        if arrived or min(len(r.tokens) for r in running) < args.after:
            return []
        arrived.append(time.perf_counter())
        return burst

    sync()
    start = time.perf_counter()
    decoder.run(running, admit=admit)
    sync()
    wall = time.perf_counter() - start
    end_of_burst = max(clock[("burst", i)][0] for i in range(args.burst))
    gaps, stalls = [], []
    for i in range(args.rows):
        times = clock[("run", i)]
        pairs = list(zip(times, times[1:]))
        gaps += [b - a for a, b in pairs]
        stalls += [b - a for a, b in pairs if b >= arrived[0] and a <= end_of_burst]
    firsts = [clock[("burst", i)][0] - arrived[0] for i in range(args.burst)]
    new_tokens = sum(len(r.tokens) for r in running + burst)
    return {"stall_ms": round(1e3 * max(stalls), 2), "step_gap_ms": round(1e3 * statistics.median(gaps), 3),
            "burst_first_ms": {"median": round(1e3 * statistics.median(firsts), 2), "max": round(1e3 * max(firsts), 2)},
            "wall_s": round(wall, 4), "new_tokens_per_s": round(new_tokens / wall, 1), "forwards": decoder.steps,
            "tokens": [r.tokens for r in running + burst]}


def main() -> None:
    from softprompt.serve.decode import Decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--rows", type=int, default=64, help="rows decoding when the burst arrives")
    parser.add_argument("--new", type=int, default=96, help="their new tokens")
    parser.add_argument("--after", type=int, default=16, help="tokens each has made when the burst arrives")
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--burst-tokens", type=int, default=256)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 16384, 4096, 2048], help="0: no budget")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "burst.json"))
    args = parser.parse_args()
    device, bank, report = served_bank(args.shape, args.tasks, "burst", "bench.probe.burst", sys.argv[1:], vars(args))
    decoder = Decoder(bank, max_rows=args.rows + args.burst, graphs=device == "cuda", compile=args.compile)
    warm_decoder(decoder)
    reference = None
    for budget in args.budgets:
        decoder.max_join_tokens = budget or None
        run(decoder, bank, args)  # warm: the slots' columns grown to the run's length
        out = run(decoder, bank, args)
        tokens = out.pop("tokens")
        reference = reference or tokens
        out["rows_equal_unbudgeted"] = f"{sum(a == b for a, b in zip(tokens, reference))}/{len(tokens)}"
        out["max_join_tokens"] = budget or None
        report["results"].append(out)
        print(out, flush=True)
        write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
