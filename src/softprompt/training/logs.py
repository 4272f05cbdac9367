"""What a run writes as it goes, besides its checkpoints and prompt:

    metrics.jsonl    one line per evaluation (fsynced; a resumed run drops the lines
                     written after its checkpoint)
    metrics.json     the final summary (best dev metric and step, wall time, why it stopped)
    curves.png       training loss and dev metric over steps
    tensorboard/     with ``train.report_to=tensorboard``
    wandb/           with ``train.report_to=wandb`` (unless $WANDB_DIR says elsewhere)

and the progress bar. `RunLog` holds the open writers and the window of losses and tokens
since the last evaluation (the throughput of each metrics line).

Experiment trackers (``train.report_to``) are accelerate's: the accelerator is built with
`tracker_options`, and `RunLog` starts them with the run's configuration as flat ``--set``
keys, sends each step's loss (``train/loss``) and each metrics line (its keys, at its step),
and ends them. Only the main process tracks.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrainingError
from ..extras import MissingExtraError, require, require_extra
from ..io.atomic import write_file_atomically, write_json_atomically
from .config import TrainConfig, dotted

log = logging.getLogger("softprompt.train")

METRICS_LINES = "metrics.jsonl"
METRICS_SUMMARY = "metrics.json"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
WANDB = "wandb"

#: a `train.report_to` name (also its extra's) -> accelerate's name of the tracker
ACCELERATE_TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet": "comet_ml"}
#: trackers with no extra: tracker -> (distribution, module), installed by hand. transformers
#: imports comet_ml as soon as it is installed (with transformers.Trainer, or peft), and comet_ml's
#: import patches torch, TensorBoard, MLflow and others, replaces sys.excepthook and may report
#: errors to Comet: in `[all]` (CI, scripts/setup.sh) every TensorBoard or MLflow run of such a
#: process also became a Comet experiment in the working directory.
BY_HAND = {"comet": ("comet-ml", "comet_ml")}


class RunLog:
    """The run's logs, from step `step` on (after a resume: the evaluations up to it).

    Args:
        output: the run directory.
        config: the training settings (report_to, project, progress, steps).
        step: the step the run starts from.
        accelerator: the run's, built with `tracker_options`; its main process writes (the
            others keep the same rows in memory) and tracks.
        run_config: the resolved run configuration (config.json's dict), the trackers'
            parameters; None: the training settings alone.
    """

    def __init__(self, output: Path, config: TrainConfig, step: int, accelerator, run_config: dict | None = None):
        self.output, self.main = output, accelerator.is_main_process
        # Only the main process rewrites metrics.jsonl on resume (`truncate_metrics`); the
        # others may read it before it has, so each keeps the rows up to the checkpoint itself.
        self.evals = [r for r in read_metrics(output / METRICS_LINES) if r["step"] <= step]
        self.tracker = None  # the accelerator while its trackers run (main process only)
        if self.main and config.trackers:
            _start_trackers(accelerator, config, output, run_config or {"train": dataclasses.asdict(config)})
            self.tracker = accelerator
        self.bar = _progress(config, step, self.main)
        self.window_loss: list[float] = []
        self.window_tokens = 0
        self.window_start = time.perf_counter()

    def loss(self, state, step: int, loss: float, tokens) -> None:
        """Step `step`'s (finite) training loss: into `state.losses`, the trackers and the bar."""
        state.losses.append([step, round(loss, 6)])
        self.window_loss.append(loss)
        if self.tracker is not None:
            self.tracker.log({"train/loss": loss}, step=step)
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
        """Append `row` to metrics.jsonl and send it to the trackers (main process only)."""
        append_metrics(self.output / METRICS_LINES, row)
        if self.tracker is not None:  # the same names and values as the metrics line
            self.tracker.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

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
        """Close the bar and end the trackers (also after a failed run: an MLflow run left
        active would refuse the next one in this process). Safe to call twice."""
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.end_training()


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


def check_trackers(config: TrainConfig) -> None:
    """Before any slow work (data, model): each tracker of ``train.report_to`` is installed,
    and MLflow's tracking store opens. accelerate itself skips a tracker it cannot import
    with a debug message, so a run would otherwise train for hours with no tracking.

    Raises:
        MissingExtraError: a tracker's package is missing (names the extra).
        ConfigError: MLflow's store cannot be opened.
    """
    for name in config.trackers:
        if name not in BY_HAND:
            require_extra(name, f"train.report_to={name}")
            continue
        dist, module = BY_HAND[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(f"train.report_to={name} needs the {module!r} package: pip install {dist} "
                                    "(no softprompt extra installs it: importing it patches torch, TensorBoard "
                                    "and MLflow in every process that imports transformers.Trainer)") from None
    if "mlflow" in config.trackers:
        import mlflow

        try:  # builds the store of $MLFLOW_TRACKING_URI (or MLflow's default) without a run
            mlflow.MlflowClient()
        except Exception as e:  # noqa: BLE001 (MLflow raises several kinds; each means the same here)
            raise ConfigError(
                f"train.report_to=mlflow: MLflow's tracking store {mlflow.get_tracking_uri()!r} cannot be opened "
                f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}). Set "
                "MLFLOW_TRACKING_URI to a server (http://...) or a folder (file:./mlruns, with "
                "MLFLOW_ALLOW_FILE_STORE=true), or pip install mlflow for its default local database") from None


def tracker_options(config: TrainConfig, output: Path) -> dict[str, Any]:
    """`accelerate.Accelerator`'s keywords for the trackers of `config` ({} for none):
    TensorBoard writes under ``output/tensorboard/``."""
    if not config.trackers:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": [ACCELERATE_TRACKERS[name] for name in config.trackers],
            "project_config": ProjectConfiguration(project_dir=str(output), logging_dir=str(output / TENSORBOARD))}


def tracker_parameters(run_config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The run configuration as the trackers' parameters: one level of ``--set`` keys
    (``train.lr``, ``task.pool``) with scalar values; lists, dicts and nulls as JSON text
    (TensorBoard's hparams and MLflow's params take scalars only)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in dotted(run_config).items()}


def _start_trackers(accelerator, config: TrainConfig, output: Path, run_config: dict[str, Any]) -> None:
    """Start the trackers: project `config.project`, the run named after its folder."""
    name = output.resolve().name
    options: dict[str, dict[str, Any]] = {"mlflow": {"run_name": name}, "wandb": {"name": name}}
    if not os.environ.get("WANDB_DIR"):
        options["wandb"]["dir"] = str(output)  # beside the run's other files, not in the working directory
    if "comet" in config.trackers:
        import comet_ml

        options["comet_ml"] = {"experiment_config": comet_ml.ExperimentConfig(name=name)}
    accelerator.init_trackers(config.project, config=tracker_parameters(run_config), init_kwargs=options)


def _progress(config: TrainConfig, done: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=done, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["RunLog", "plot_curves", "append_metrics", "read_metrics", "truncate_metrics", "check_trackers",
           "tracker_options", "tracker_parameters"]
