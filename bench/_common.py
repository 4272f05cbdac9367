"""What the quality benchmarks share: where they ran, versions, JSON reports written
atomically and merged by row, our rows through `softprompt.run.run_training`, and rows
run in parallel worker processes (several small models share one GPU well: a step of
MiniLM or SmolLM2-135M is launch-bound, not compute-bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))


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


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server the benchmark starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url`/health until it answers 200; RuntimeError if `alive()` turns false first
    (the server process exited) or after `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if not alive():
            raise RuntimeError("the server exited before it answered /health")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
        time.sleep(0.2)


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


def run_ours(cfg, *, keep: str | None = None) -> dict[str, Any]:
    """Train with `softprompt.run.run_training` (as `softprompt train` does) in a scratch
    run directory; return the evaluations, best dev metric, trainable parameters and time.

    Args:
        cfg: a `RunConfig` (its output is replaced by a temporary directory).
        keep: copy the trained prompt folder there (e.g. to evaluate it on test).
    """
    import shutil

    from softprompt.io.atomic import load_tensors
    from softprompt.training.run import run_training

    with tempfile.TemporaryDirectory() as out:
        cfg.output = out
        start = time.perf_counter()
        result = run_training(cfg)
        wall = time.perf_counter() - start
        evals = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        resolved = json.loads((Path(out) / "config.json").read_text())
        prompt = Path(out) / "prompt"
        params = sum(t.numel() for file in ("trainable.safetensors", "head.safetensors") if (prompt / file).exists()
                     for t in load_tensors(prompt / file).values())
        if keep:
            shutil.copytree(prompt, keep, dirs_exist_ok=True)
    metric = result.metrics.get("metric")
    return {"template": resolved["template"], "num_virtual_tokens": resolved["num_virtual_tokens"],
            "trainable_params": params, "metric": metric,
            "evals": [[e["step"], e[metric]] for e in evals], "best_dev": result.best_metric,
            "best_step": result.best_step, "test": result.metrics.get("test"), "train_seconds": result.metrics.get("train_seconds"),
            "wall_seconds": round(wall, 1)}


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


def run_command(script: str, args, extra: str = "") -> str:
    """The command line that reruns a report with `args` (``extra``: the script's own options)."""
    return (f"python bench/{script} --steps {args.steps} --batch-size {args.batch_size} --eval-every {args.eval_every} "
            f"{extra + ' ' if extra else ''}--seed {args.seed} --jobs {args.jobs}")


def subset(flag: str, chosen, default) -> str:
    """``--rows a b`` when a run was limited to some rows (quoted where a name has a ``|``)."""
    if not chosen or list(chosen) == list(default or []):
        return ""
    return flag + " " + " ".join(f'"{c}"' if "|" in c else c for c in chosen)


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"
