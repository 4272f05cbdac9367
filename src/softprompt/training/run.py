"""From a run configuration to a trained prompt: what `softprompt train` does, callable from
Python. Assemble (data, base model, task, prompt), train, then score the best prompt on the
test split.

    result = run_training(RunConfig(model="minilm", method="p-tuning-v2", task="sst2", output="runs/sst2"))
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..architecture import model_kind
from ..base_models import load_base, resolve_device, training_dtype
from ..errors import TrainingError
from ..folder import RUN_PROMPT, has_task
from ..io.atomic import read_json_object, write_file_atomically, write_json_atomically
from ..model import SoftPromptModel
from . import loop
from .assemble import build_task, check_examples, check_task_options, load_data, prompt_config, uses_verbalizer
from .checkpoint import CHECKPOINT
from .config import RunConfig, apply, load_yaml
from .evaluate import evaluate_saved
from .logs import CURVES, METRICS_LINES, METRICS_SUMMARY, TENSORBOARD, WANDB, check_trackers
from .loop import RunResult

CONFIG = "config.json"
CONFIG_YAML = "config.yaml"  # the same, as a run file to read, edit and replay: `--config RUN/config.yaml`
RUN_MARKERS = (CONFIG, METRICS_LINES, CHECKPOINT, RUN_PROMPT)
RUN_FILES = RUN_MARKERS + (CONFIG_YAML, METRICS_SUMMARY, CURVES, TENSORBOARD, WANDB)  # all a run writes in its folder
RESULTS = (METRICS_LINES, METRICS_SUMMARY, CHECKPOINT, RUN_PROMPT)  # what a failed run leaves worth keeping


def _is_main_process() -> bool:
    """Whether this process owns the run folder: the only one, or rank 0 of a distributed
    run (torchrun / accelerate launch set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_output(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse an output that cannot take this run, touching nothing. Only the main process
    refuses a folder that holds a run: the others of a distributed run may look after it
    has written this run's config.json."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output {out} exists and is not a directory")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if resume:
        if not (out / CHECKPOINT).is_dir():
            raise TrainingError(f"--resume: {out} holds no checkpoint to continue from")
    elif holds_run and not overwrite and _is_main_process():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    return out


def _prepare_output(out: Path, clear: bool) -> Path | None:
    """Create the directory, first clearing a replaced run's files if `clear`: called only
    once everything the run needs (data, model, template, task) has loaded, so a refused
    run loses nothing.

    Returns:
        The outermost folder this created (`out` or a parent of it); None if `out` existed.
    """
    if clear:
        _remove(out, RUN_FILES)
    created = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        created = folder
    out.mkdir(parents=True, exist_ok=True)
    return created


def _remove(out: Path, names) -> None:
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _forget_failed_start(out: Path, created: Path | None) -> None:
    """A new run that failed with nothing to keep (no checkpoint, prompt or metrics: it
    failed before its first step, say) leaves nothing behind: the folders it created go,
    or, in a folder that was there, the files it wrote. So the rerun needs no --overwrite.
    Best effort: the error that ended the run is the one to report."""
    if any((out / name).exists() for name in RESULTS):
        return
    try:
        if created is not None:
            shutil.rmtree(created)
        else:
            _remove(out, RUN_FILES)
    except OSError:  # another process of the run removing them too, say
        pass


def train(config: RunConfig | str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          **settings: Any) -> RunResult:
    """Train a soft prompt from Python, as `softprompt train` does (the same checks, run
    folder and metrics).

    Args:
        config: a `RunConfig`, or a YAML run file (``--config``; a run folder's own
            ``config.yaml`` too); None: the defaults.
        resume / overwrite: as ``--resume`` / ``--overwrite`` (an output folder that holds
            a run is refused otherwise).
        **settings: the settings on top, named as `RunConfig`'s fields (``model``,
            ``task``, ``train_file``, ``output``, ...), with ``train``, ``prompt`` and
            ``task_options`` (or ``task`` for a recipe name) as dicts of their keys, e.g.
            ``train={"lr": 0.3, "steps": 500}``. An unknown key is refused with the closest
            known one.

    Example:
        >>> result = softprompt.train(model="minilm", task="sst2", method="prompt-tuning",
        ...                           output="runs/sst2", train={"steps": 200})
        >>> result.metrics["best"]
    """
    if isinstance(config, RunConfig):
        cfg = copy.deepcopy(config)
    else:
        cfg = RunConfig()
        if config is not None:
            load_yaml(config, cfg)
    if isinstance(settings.get("task"), dict):  # task={...} is the task's options (`task.*` of --set)
        settings["task_options"] = settings.pop("task")
    for section in ("train", "prompt", "task_options"):
        for key, value in (settings.pop(section, None) or {}).items():
            apply(cfg, f"{'task' if section == 'task_options' else section}.{key}", value, source="train()")
    for key, value in settings.items():
        apply(cfg, key, value, source="train()")
    return run_training(cfg, resume=resume, overwrite=overwrite)


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train as `softprompt train` does; returns the result (metrics also in the run dir).

    Nothing is written until every row of every split has been checked and the model,
    template and task have loaded; a new run that then fails with nothing to keep (before
    its first step, say) removes what it wrote (`_forget_failed_start`)."""
    if resume:
        recorded = Path(cfg.output) / CONFIG
        if not recorded.is_file():
            raise TrainingError(f"--resume: {recorded} is missing")
        cfg = RunConfig.from_dict(read_json_object(recorded))
    cfg.validate()
    check_trackers(cfg.train)  # a tracker not installed is named before the data and model load
    out = _check_output(cfg, resume, overwrite)
    data = load_data(cfg)
    if not data.train:
        raise TrainingError("the training split is empty")
    check_task_options(cfg, data)
    device = resolve_device(cfg.device)
    base, tokenizer = load_base(cfg.model, head="auto", dtype=training_dtype(cfg.dtype, device),
                                tensor_parallel=cfg.tensor_parallel)
    if not cfg.tensor_parallel:  # a split base is already on each process's device
        base.to(device)
    kind = model_kind(base)
    task = build_task(cfg, data, uses_verbalizer(cfg, data, kind, base.get_output_embeddings() is not None))
    model = SoftPromptModel(base, prompt_config(cfg, data, task, kind), tokenizer=tokenizer)
    model.max_length = cfg.max_length
    check_examples(model, task, data)
    resolved = cfg.to_dict() | {"template": model.config.template, "num_virtual_tokens": model.num_virtual_tokens,
                                "resolved_task": task.kind, "data": data.source}
    # One process of a distributed run owns the folder: the others would race it clearing a
    # replaced run and writing config.json.
    main = _is_main_process()
    created = _prepare_output(out, clear=main and not resume)
    metadata = {"task": task.kind, "model": cfg.model, "data": data.source, "max_length": cfg.max_length,
                "train": {k: v for k, v in dataclasses.asdict(cfg.train).items()
                          if k not in ("progress", "report_to", "project")}}  # how it trained, not how it was watched
    try:
        if not resume and main:
            write_json_atomically(out / CONFIG, resolved)
            write_file_atomically(out / CONFIG_YAML, lambda tmp: tmp.write_text(
                yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8"))
        result = loop.train(model, task, data.train, data.dev, cfg.train, out, resume=resume, metadata=metadata,
                            run_config=resolved)
    except BaseException:
        if not resume and main:
            _forget_failed_start(out, created)
        raise
    result.metrics["selected_on"] = data.selected_on  # the held-out protocol, said in the run's own record
    result.metrics["reported_on"] = f"test: {data.describe('test')}" if data.test else None
    if data.test and data.test != data.dev and has_task(out / RUN_PROMPT):
        # Model selection on dev, the reported number on test: the best prompt, not the last.
        scores, _ = evaluate_saved(out / RUN_PROMPT, model.base, tokenizer, data.test, cfg.train.eval_batch_size)
        result.metrics["test"] = scores
    if main:
        write_json_atomically(out / METRICS_SUMMARY, result.metrics)
    return result


__all__ = ["run_training"]
