"""Reports: where they go, where they ran (device, versions), JSON written atomically and
merged by row, rows run in parallel worker processes (several small models share one GPU
well: a step of MiniLM or SmolLM2-135M is launch-bound, not compute-bound), and the
command line that reruns a report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def load_report(name: str) -> dict | None:
    """The report `name` in bench/results/ (None: not measured yet)."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def device_name() -> str:
    """``NVIDIA H100 80GB HBM3 (bf16 autocast)`` or ``CPU, 2 cores (x86_64)``."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (bf16 autocast)"
    return f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"


def versions() -> dict[str, str]:
    import torch
    import transformers

    import softprompt

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "softprompt": getattr(softprompt, "__version__", "?")}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def write_text(text: str, out: Path) -> None:
    """Write a file atomically (a temporary name, then rename): readers never see half of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def write_json(report: dict, out: Path) -> None:
    write_text(json.dumps(report, indent=2) + "\n", out)


def start_report(out: Path, header: dict[str, Any], rerun: list[str]) -> dict[str, Any]:
    """A new report; rows of an earlier report with the same settings are kept unless rerun."""
    report = {**header, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("settings") == header.get("settings"):
            report["rows"] = [r for r in old.get("rows", []) if r["row"] not in rerun]
            report["started"] = old.get("started", report["started"])
    return report


def _quiet_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _guarded(fn: Callable[[str, Any], dict], name: str, args: Any) -> dict:
    start = time.perf_counter()
    try:
        row = fn(name, args)
    except Exception as e:  # a failing row is reported, not fatal
        traceback.print_exc()
        row = {"error": f"{type(e).__name__}: {e}"}
    row.setdefault("wall_seconds", round(time.perf_counter() - start, 1))
    return {"row": name, **row}


def run_rows(fn: Callable[[str, Any], dict], names: list[str], args: Any, report: dict, out: Path,
             jobs: int = 1, on_row: Callable[[dict], None] | None = None) -> dict:
    """Run `fn(name, args)` for each row, `jobs` at a time in worker processes (1: in this
    process), merging each finished row into `report` and rewriting `out` at once, so a
    partial run survives."""
    order = {n: i for i, n in enumerate(names)}

    def merge(row: dict) -> None:
        report["rows"] = [r for r in report["rows"] if r["row"] != row["row"]] + [row]
        report["rows"].sort(key=lambda r: order.get(r["row"], len(order)))
        write_json(report, out)
        status = f"FAILED {row['error']}" if "error" in row else (on_row(row) if on_row else "done")
        print(f"[{time.strftime('%H:%M:%S')}] {row['row']}: {status} ({row.get('wall_seconds')} s)", flush=True)

    if jobs <= 1:
        for name in names:
            merge(_guarded(fn, name, args))
    else:
        threads = max(1, (os.cpu_count() or 2) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_quiet_worker,
                                 initargs=(threads,)) as pool:
            futures = [pool.submit(_guarded, fn, name, args) for name in names]
            for future in as_completed(futures):
                merge(future.result())
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(report, out)
    return report


def run_parser(doc: str, out: Path, *, steps: int, batch_size: int, eval_every: int) -> argparse.ArgumentParser:
    """The arguments every quality benchmark takes (its defaults are the settings it was run with)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes")
    parser.add_argument("--data-root", default=None, help="data folder (default: $SOFTPROMPT_DATA, ../shared/data)")
    parser.add_argument("--out", default=str(out))
    return parser


def run_settings(args) -> dict[str, Any]:
    return {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.eval_every, "seed": args.seed}


def run_command(module: str, args, extra: str = "") -> str:
    """The command line that reruns a quality report with `args` (``extra``: the module's own options)."""
    return (f"python -m {module} --steps {args.steps} --batch-size {args.batch_size} --eval-every {args.eval_every} "
            f"{extra + ' ' if extra else ''}--seed {args.seed} --jobs {args.jobs}")


def rerun_command(module: str, argv: list[str]) -> str:
    """The command line that reruns a benchmark: the arguments given, less where the report was written."""
    kept = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")
            and not a.startswith("--out=")]
    return " ".join(["python -m " + module, shlex.join(kept)]) if kept else "python -m " + module


# Reports written before bench/ became a package name the flat scripts; the renderers show
# their commands in the entry points' form (the JSON stays as it was measured).
_MOVED = {"quality_sst2": "bench.quality.sst2", "quality_wnut17": "bench.quality.wnut17",
          "quality_lama": "bench.quality.lama", "quality_fewglue": "bench.quality.fewglue",
          "merge_reports": "bench.quality.merge", "train_throughput": "bench.train.throughput",
          "train_distributed": "bench.train.distributed", "train_time_to_accuracy": "bench.train.time_to_accuracy",
          "serve_throughput": "bench.serve.throughput", "serve_http": "bench.serve.http",
          "serve_load": "bench.serve.load", "random_served": "bench.serve.random_served",
          "prompt_bytes": "bench.probe.prompt_bytes", "sdpa_nan_probe": "bench.probe.sdpa_nan",
          "profile_train_step": "bench.probe.profile_train_step", "render_results": "bench.render.results",
          "render_performance": "bench.render.performance", "render_training": "bench.render.training"}
_SCRIPT = re.compile(r"(?:\bpython3? )?\bbench/(" + "|".join(_MOVED) + r")\.py\b")


def shown_command(command: str) -> str:
    """`command` as a report recorded it, with an old script (``python bench/quality_sst2.py``)
    named as its entry point (``python -m bench.quality.sst2``; after a launcher: ``-m ...``)."""
    return _SCRIPT.sub(lambda m: ("python " if m.group(0).startswith("python") else "") + "-m " + _MOVED[m.group(1)],
                       command)


def shown_path(text: str) -> str:
    """`text` with an old script's path (``bench/sdpa_nan_probe.py``) as its module's file."""
    return re.sub(r"\bbench/(" + "|".join(_MOVED) + r")\.py\b",
                  lambda m: _MOVED[m.group(1)].replace(".", "/") + ".py", text)


def subset(flag: str, chosen, default) -> str:
    """``--rows a b`` when a run was limited to some rows (quoted where a name has a ``|``)."""
    if not chosen or list(chosen) == list(default or []):
        return ""
    return flag + " " + " ".join(f'"{c}"' if "|" in c else c for c in chosen)


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"
