"""What a run writes as it goes, besides its checkpoints and prompt:

    metrics.jsonl    one line per evaluation (fsynced; a resumed run drops the lines
                     written after its checkpoint)
    metrics.json     the final summary (best dev metric and step, wall time, why it stopped)
    curves.png       training loss and dev metric over steps
    tensorboard/     optional

and the progress bar. `RunLog` holds the open writers and the window of losses and tokens
since the last evaluation (the throughput of each metrics line).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrainingError
from ..extras import MissingExtraError, require
from ..io.atomic import write_file_atomically, write_json_atomically
from .config import TrainConfig

log = logging.getLogger("softprompt.train")

METRICS_LINES = "metrics.jsonl"
METRICS_SUMMARY = "metrics.json"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"


class RunLog:
    """The run's logs, from step `step` on (after a resume: the evaluations up to it).

    Args:
        output: the run directory.
        config: the training settings (tensorboard, progress, steps).
        step: the step the run starts from.
        main: whether this process writes (the others keep the same rows in memory).
    """

    def __init__(self, output: Path, config: TrainConfig, step: int, main: bool):
        self.output, self.main = output, main
        # Only the main process rewrites metrics.jsonl on resume (`truncate_metrics`); the
        # others may read it before it has, so each keeps the rows up to the checkpoint itself.
        self.evals = [r for r in read_metrics(output / METRICS_LINES) if r["step"] <= step]
        self.writer = _tensorboard(output, config) if main else None
        self.bar = _progress(config, step, main)
        self.window_loss: list[float] = []
        self.window_tokens = 0
        self.window_start = time.perf_counter()

    def loss(self, state, step: int, loss: float, tokens) -> None:
        """Step `step`'s (finite) training loss: into `state.losses`, TensorBoard and the bar."""
        state.losses.append([step, round(loss, 6)])
        self.window_loss.append(loss)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
        if self.bar is not None:
            elapsed = time.perf_counter() - self.window_start
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{float(tokens) / max(elapsed, 1e-9):,.0f}",
                                 dev=f"{state.best_metric:.4f}" if state.best_metric is not None else "-")

    def evaluation(self, state, scores: dict[str, float], lr: float) -> dict[str, Any]:
        """The metrics line of an evaluation at `state.step`; starts a new window."""
        elapsed = time.perf_counter() - self.window_start
        row = {"step": state.step, "epoch": state.epoch, "train_loss": sum(self.window_loss) / len(self.window_loss),
               **scores, "lr": lr, "tokens_per_s": float(self.window_tokens) / max(elapsed, 1e-9),
               "train_seconds": state.train_seconds}
        self.window_loss, self.window_tokens, self.window_start = [], 0, time.perf_counter()
        self.evals.append(row)
        return row

    def write_evaluation(self, row: dict[str, Any], scores: dict[str, float]) -> None:
        """Append `row` to metrics.jsonl and the scores to TensorBoard (main process only)."""
        append_metrics(self.output / METRICS_LINES, row)
        if self.writer is not None:
            for k, v in scores.items():
                self.writer.add_scalar(f"dev/{k}", v, row["step"])

    def finish(self, state, metric: str, stopped: str, processes: int) -> dict[str, Any]:
        """The summary; the main process writes it (metrics.json) and the curves."""
        best = next((e for e in self.evals if e["step"] == state.best_step), None)
        summary = {"metric": metric, "best": best, "best_step": state.best_step, "steps": state.step,
                   "train_seconds": round(state.train_seconds, 3), "stopped": stopped, "processes": processes}
        if self.main:
            write_json_atomically(self.output / METRICS_SUMMARY, summary)
            try:
                plot_curves([tuple(x) for x in state.losses], self.evals, metric, self.output / CURVES)
            except MissingExtraError as e:  # the run itself is complete: the plot alone is missing
                log.warning("%s not drawn: %s", CURVES, e)
        return summary

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def plot_curves(losses: list[tuple[int, float]], evals: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Training loss and dev metric over steps, as a PNG (written atomically)."""
    matplotlib = require("matplotlib", "plots", "drawing the training curves")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], color="tab:blue", linewidth=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:orange", label=f"dev {metric}")
        ax2.set_ylabel(f"dev {metric}", color="tab:orange")
    ax.set_title("softprompt training")
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One metrics line, on disk (fsynced) before the checkpoint that follows it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The evaluation lines of metrics.jsonl ([] when there is none yet)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    # Every row ends with a newline; a last line without one is the remnant of an append cut
    # short by a kill (or a full disk). Its evaluation reached no checkpoint, so a resumed run
    # redoes it: the fragment is dropped here (and by `truncate_metrics` from the file).
    rows = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TrainingError(f"{path}: line {number} is not a JSON object ({e.msg}); "
                                "remove it to resume") from None
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop evaluation lines written after the checkpoint (they will be redone)."""
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    write_file_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))


def _tensorboard(output: Path, config: TrainConfig):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(output / TENSORBOARD))


def _progress(config: TrainConfig, done: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=done, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["RunLog", "plot_curves", "append_metrics", "read_metrics", "truncate_metrics"]
