"""Merge the JSON reports of several runs of one quality benchmark into one report (a long
run split over several invocations, e.g. with `python -m bench.quality.lama --only`).

    python -m bench.quality.merge first.json second.json ... --out bench/results/quality_lama.json

The first report gives the header (settings, command); rows are keyed by their ``row`` name
and the first successful occurrence wins (a row that failed in one part and succeeded in a
rerun takes the rerun's). Every part's device, dates and command are kept under
``parts``, so the merged report says how it was assembled. Reports whose settings differ
in anything but a learning-rate list that is a subset of the first's are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.harness.report import write_json


def compatible(first: dict, other: dict) -> bool:
    a, b = dict(first.get("settings", {})), dict(other.get("settings", {}))
    if "lrs" in a and "lrs" in b and set(b["lrs"]) <= set(a["lrs"]):
        a.pop("lrs"), b.pop("lrs")
    return a == b


def merge(reports: list[dict]) -> dict:
    first = reports[0]
    for i, other in enumerate(reports[1:], 2):
        if other.get("benchmark") != first.get("benchmark") or not compatible(first, other):
            raise SystemExit(f"report {i} is not a part of the same benchmark and settings as the first")
    out = {k: v for k, v in first.items() if k not in ("rows", "parts")}
    rows: dict[str, dict] = {}
    parts = []
    for rep in reports:
        for p in rep.get("parts", [rep]):
            parts.append({k: p.get(k) for k in ("device", "started", "finished", "command")}
                         | {"rows": len(p.get("rows", [])) if "rows" in p else p.get("rows_count")})
        for r in rep["rows"]:
            if r["row"] not in rows or ("error" in rows[r["row"]] and "error" not in r):
                rows[r["row"]] = r
    out["rows"] = list(rows.values())
    out["parts"] = [{**p, "rows_count": p.pop("rows")} for p in parts]
    out["started"] = min(p["started"] for p in out["parts"] if p.get("started"))
    out["finished"] = max((p["finished"] for p in out["parts"] if p.get("finished")), default=None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    merged = merge([json.loads(Path(p).read_text()) for p in args.reports])
    write_json(merged, Path(args.out))
    print(f"wrote {args.out}: {len(merged['rows'])} rows from {len(merged['parts'])} runs")


if __name__ == "__main__":
    main()
