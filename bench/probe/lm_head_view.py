"""The LM head over the last column of a prefill, given as transformers slices it for an
int ``logits_to_keep`` (``hidden[:, -1:]``, a view whose rows lie a whole sequence apart)
and as an index (`inject.last_columns`: a contiguous copy first).

    python -m bench.probe.lm_head_view --out bench/results/lm_head_view_h100.json

64 rows of 84 columns, width 2048, vocabulary 128256 (the 1B Llama shape's join in S1), bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.harness.report import RESULTS, rerun_command, versions, write_json
from bench.harness.timing import measure

VOCAB, WIDTH = 128256, 2048  # the 1B Llama shape's LM head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--columns", type=int, default=84)
    parser.add_argument("--out", default=str(RESULTS / "lm_head_view.json"))
    args = parser.parse_args()
    hidden = torch.randn(args.rows, args.columns, WIDTH, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(VOCAB, WIDTH, device="cuda", dtype=torch.bfloat16)
    last = torch.arange(args.columns - 1, args.columns, device="cuda")
    report = {"benchmark": "lm_head_view", "device": torch.cuda.get_device_name(0), "versions": versions(),
              "command": rerun_command("bench.probe.lm_head_view", sys.argv[1:]), "settings": vars(args)}
    for name, x in (("view", lambda: hidden[:, -1:]), ("index", lambda: hidden[:, last])):
        report[f"{name}_ms"] = 1e3 * measure(lambda: torch.nn.functional.linear(x(), weight), warmup=3, calls=10,
                                             windows=3).seconds
    print(report, flush=True)
    write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
