"""The training loop, on `accelerate`: the same code on the CPU, one GPU or several.

A run directory holds

    config.json        the resolved run configuration (written by the caller)
    metrics.jsonl      one line per evaluation
    metrics.json       the final summary (best dev metric and step, wall time, why it stopped)
    curves.png         training loss and dev metric over steps
    prompt/            the best prompt so far (+ head.safetensors, task.json): what `eval` /
                       `predict` / `serve` load
    checkpoint/        the latest full training state, for `--resume`: prompt and head
                       state, AdamW moments, RNG state, data position (safetensors + JSON)
    tensorboard/       optional

Every file is written atomically (temporary name, then rename), and the checkpoint holds
everything needed to continue an interrupted CPU run to bit-identical final weights.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from .batches import BatchStream, epoch_batches, example_length
from .errors import ConfigError, TrainingError
from .io import (load_tensors, read_json_object, remove_stale_temporaries, write_directory_atomically,
                 write_file_atomically, write_json_atomically)
from .tasks.base import Task

SCHEDULES = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Settings of one training run.

    Attributes:
        steps: optimiser steps (an upper bound when early stopping is on).
        batch_size: examples per micro-batch, over all processes.
        grad_accum: micro-batches per optimiser step.
        lr: learning rate of the prompt; head_lr: of the task head.
        weight_decay: AdamW weight decay (prompt and head).
        warmup_ratio: share of `steps` with a linear warm-up.
        schedule: decay after warm-up: linear, cosine or constant.
        max_grad_norm: gradient clipping (0: off).
        seed: data order, dropout and initialisation; a CPU run is bit-reproducible.
        eval_every: evaluate (and checkpoint) every N steps; 0: only at the end.
        eval_batch_size: examples per evaluation batch.
        patience: stop after this many evaluations without improvement (None: never).
        bucket: group examples of similar length into batches (less padding).
        mixed_precision: auto (bf16 autocast for an fp32 base on a GPU; a base loaded in
            bf16 / fp16, or on the CPU, runs as it is), no, bf16.
        compile: `torch.compile` the base's repeated blocks for training forwards (regional
            compilation): false, true (`torch.compile`'s default mode) or a mode name,
            ``reduce-overhead`` (each block's forward and backward replayed as CUDA graphs:
            fewer launches, for small models whose steps the host bounds) or ``max-autotune``.
        gradient_checkpointing: recompute each block's activations in the backward pass
            (less memory, about one more forward of time); works for deep prompts too.
        tensorboard: also write TensorBoard logs.
        progress: show a progress bar.
    """

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-2
    head_lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batch_size: int = 64
    patience: int | None = None
    bucket: bool = True
    mixed_precision: str = "auto"
    compile: bool | str = False
    gradient_checkpointing: bool = False
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be a non-negative integer, got {self.eval_every!r}")
        for name in ("lr", "head_lr"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not isinstance(self.warmup_ratio, (int, float)) or isinstance(self.warmup_ratio, bool) \
                or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be a number in [0, 1), got {self.warmup_ratio!r}")
        if self.compile not in (True, False) + COMPILE_MODES:
            raise ConfigError(f"train.compile must be true, false or one of {COMPILE_MODES}, got {self.compile!r}")
        for name in ("bucket", "gradient_checkpointing", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise ConfigError(f"train.patience must be a positive integer or null, got {self.patience!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# -- the trainable unit -------------------------------------------------------------
class PromptAndHead(nn.Module):
    """The SoftPromptModel and its task as one module, so DDP / FSDP wrap them together."""

    def __init__(self, model, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch, targets) -> torch.Tensor:
        return self.task.loss(self.model, batch, targets)


def _param_groups(model, task: Task, config: TrainConfig) -> list[dict]:
    groups = [{"params": [p for p in model.prompt.parameters() if p.requires_grad], "lr": config.lr, "name": "prompt"}]
    head = [p for p in task.parameters() if p.requires_grad]
    if head:
        groups.append({"params": head, "lr": config.head_lr, "name": "head"})
    if not groups[0]["params"]:
        raise ConfigError("the prompt has no trainable parameters (a collapsed prompt? load it with trainable=True)")
    return groups


def make_optimizer(model, task: Task, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the prompt and the head (their own learning rates), one fused kernel (it can
    skip a step on the device: see `_update_guard`)."""
    return torch.optim.AdamW(_param_groups(model, task, config), weight_decay=config.weight_decay, fused=True)


def _update_guard(optimizer) -> torch.optim.Optimizer | None:
    """The optimizer whose ``found_inf`` flag (a 0-dim float tensor; 1 skips the update and
    its step count, as under a GradScaler) the loop sets each step; None if it has none."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the torch optimizer
    return inner if getattr(inner, "_step_supports_amp_scaling", False) and inner.defaults.get("fused") else None


# -- evaluation ---------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, task: Task, examples: Sequence[dict], batch_size: int = 64) -> tuple[dict[str, float], list[Any]]:
    """Metrics and per-example predictions (in the input order) of `task` on `examples`."""
    if not examples:
        raise TrainingError("nothing to evaluate: the evaluation split is empty")
    was_training = model.training
    model.eval()
    task.eval()
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    predictions: list[Any] = [None] * len(examples)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch, _ = task.collate(model, [examples[i] for i in idx], with_targets=False)
            for i, p in zip(idx, task.predict(model, batch)):
                predictions[i] = p
    finally:
        model.train(was_training)
        task.train(was_training)
    references = [task.reference(e) for e in examples]
    return task.metrics(predictions, references), predictions


# -- checkpoints --------------------------------------------------------------------
def _fsdp2(module) -> bool:
    """Whether `module` was sharded by FSDP 2 (`fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP 2
        return False
    return isinstance(module, FSDPModule)


@contextmanager
def _whole(wrapped, unit: PromptAndHead) -> Iterator[None]:
    """Within the block the unit's own parameters are whole on every process.

    Under FSDP 2 the parameters that belong to no sharded block (the prompt, the head, the
    base's embeddings and final layers) are sharded tensors; evaluation and saving read them
    outside the unit's forward, so each is replaced by its gathered copy until the block
    ends (a collective: every process enters together). The base's sharded blocks gather
    their own weights whenever they run. Elsewhere (one process, DDP) nothing happens.
    """
    if not _fsdp2(wrapped):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    swapped = []

    def gather(module: nn.Module) -> None:
        for name, param in list(module._parameters.items()):
            if param is not None and hasattr(param, "full_tensor"):
                module._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
        for child in module.children():
            if not isinstance(child, FSDPModule):  # a sharded block gathers itself
                gather(child)

    gather(unit)
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def _full(value: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) optimizer state gathered whole (a collective: every process calls it)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _save_checkpoint(directory: Path, unit: PromptAndHead, optimizer, state: dict[str, Any], *,
                     write: bool = True) -> None:
    """Every process calls this (sharded optimizer states are gathered collectively);
    the process with `write` writes."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in unit.model.prompt.state_dict().items():
        tensors[f"prompt.{k}"] = v
    for k, v in unit.task.state_dict().items():
        tensors[f"task.{k}"] = v
    opt = optimizer.state_dict()
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = _full(value) if torch.is_tensor(value) else torch.tensor(value)
    if not write:
        return
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt["param_groups"]]

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n")

    write_directory_atomically(directory, write)


def _load_checkpoint(directory: Path, unit: PromptAndHead, optimizer) -> dict[str, Any]:
    path = directory / "trainer_state.json"
    if not path.is_file():
        raise TrainingError(f"{directory}: no checkpoint to resume from (trainer_state.json missing)")
    state = read_json_object(path)
    tensors = load_tensors(directory / "state.safetensors")
    try:
        unit.model.prompt.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("prompt.")})
        unit.task.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("task.")})
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, index, key = k.split(".", 2)
                opt_state.setdefault(int(index), {})[key] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
        torch.set_rng_state(tensors["rng.cpu"])
    except (RuntimeError, KeyError, ValueError) as e:  # another prompt's or task's checkpoint
        what = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:400] or type(e).__name__
        raise TrainingError(f"{directory}: the checkpoint does not fit this run's prompt and task ({what})") from None
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def save_for_inference(model, task: Task, directory: Path, metadata: dict[str, Any]) -> None:
    """The prompt with its task head and settings, as `eval` / `predict` / `serve` load it."""
    model.save_pretrained(
        directory,
        metadata=metadata,
        extra_tensors={"head.safetensors": task.state_dict()} if len(task.state_dict()) else {},
        extra_json={"task.json": task.to_config()},
    )


# -- plots --------------------------------------------------------------------------
def plot_curves(losses: list[tuple[int, float]], evals: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Training loss and dev metric over steps, as a PNG (written atomically)."""
    import matplotlib

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


# -- the loop -----------------------------------------------------------------------
@dataclass
class RunResult:
    """What `train` returns (also written to metrics.json)."""

    best_metric: float | None
    best_step: int | None
    steps: int
    stopped: str
    metrics: dict[str, Any] = field(default_factory=dict)


def _schedule(optimizer, config: TrainConfig):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(config.warmup_ratio * config.steps),
                         num_training_steps=config.steps)


def train(
    model,
    task: Task,
    train_examples: Sequence[dict],
    eval_examples: Sequence[dict] | None,
    config: TrainConfig,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
) -> RunResult:
    """Train `model`'s prompt and `task`'s head; write the run directory `output`.

    Args:
        model: a SoftPromptModel (its base stays frozen).
        task: the task; `bind` is called here.
        train_examples / eval_examples: example dicts (see tasks/base.py).
        config: the training settings.
        output: the run directory (must exist; the caller writes config.json there).
        resume: continue from ``output/checkpoint``.
        metadata: stored with the saved prompt (task name, data, ...).

    Raises:
        TrainingError: empty training data, a non-finite loss (the last good checkpoint
            and best prompt are kept), or nothing to resume from.
    """
    config.validate()
    if not train_examples:
        raise TrainingError("no training examples")
    options = {"mode": config.compile} if isinstance(config.compile, str) else None
    with model.accelerated(compile=config.compile is not False, checkpointing=config.gradient_checkpointing,
                           compile_options=options):
        return _train(model, task, train_examples, eval_examples, config, output, resume=resume, metadata=metadata)


def _train(model, task: Task, train_examples: Sequence[dict], eval_examples: Sequence[dict] | None,
           config: TrainConfig, output: str | os.PathLike, *, resume: bool, metadata: dict[str, Any] | None) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)  # a new folder, from Python (the CLI made it already)
    mixed = config.mixed_precision
    if mixed == "auto":
        # Autocast pays for fp32 weights; over a bf16 base it only adds casts (and runs
        # norms and softmaxes in fp32), so a half-precision base runs as it was loaded.
        on_gpu = model.device.type == "cuda"
        mixed = "bf16" if on_gpu and model.base.get_input_embeddings().weight.dtype == torch.float32 else "no"
    # A base on the CPU trains on the CPU; launched as several processes (torchrun), that is
    # accelerate's multi-CPU mode (gloo), which it enters only when told the run is on the CPU.
    accelerator = Accelerator(mixed_precision=mixed, cpu=model.device.type == "cpu")
    if accelerator.distributed_type.name == "DEEPSPEED":
        # Tried (ZeRO-3, deepspeed 0.19.8, 2 x H200): the steps run, but DeepSpeed's partitioned
        # optimizer has no per-parameter AdamW moments for the checkpoint, so a run could not be
        # resumed; refused before any work rather than failing at the first checkpoint.
        raise ConfigError("DeepSpeed is not supported: shard a large base with FSDP 2 instead "
                          "(`accelerate launch --use_fsdp --fsdp_version 2 ...`; see docs/PERFORMANCE.md)")
    set_seed(config.seed)
    task.bind(model)
    model.train()
    task.train()
    unit = PromptAndHead(model, task)
    optimizer = make_optimizer(model, task, config)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_metric": None, "best_step": None,
                             "bad_evals": 0, "losses": [], "tokens": 0, "train_seconds": 0.0}
    if resume:
        state = _load_checkpoint(output / "checkpoint", unit, optimizer)
        if accelerator.is_main_process:
            _truncate_metrics(output / "metrics.jsonl", state["step"])
            remove_stale_temporaries(output)  # a checkpoint or prompt half-written by the killed run
    scheduler = _schedule(optimizer, config)
    with warnings.catch_warnings():  # fast-forwarding the schedule, not skipping an optimiser step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state["step"]):
            scheduler.step()  # the schedule is a pure function of the step
    wrapped, optimizer = accelerator.prepare(unit, optimizer)
    if accelerator.distributed_type.name == "FSDP" and not _fsdp2(wrapped):
        # FSDP 1 flattens the prompt into shards that saving and evaluation cannot read whole.
        raise ConfigError("FSDP version 1 is not supported: launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`")
    world, rank = accelerator.num_processes, accelerator.process_index
    # Only the main process rewrites metrics.jsonl on resume (above); the others may read it
    # before it has, so each keeps the rows up to the checkpoint itself.
    evals = [r for r in _read_metrics(output / "metrics.jsonl") if r["step"] <= state["step"]]
    writer = _tensorboard(output, config) if accelerator.is_main_process else None
    metric = task.metric
    stopped = "max steps"
    bar = _progress(config, state["step"], accelerator.is_main_process)
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    # With a fused AdamW the update of a non-finite step is skipped on the device (the kernel's
    # found_inf flag), so the loss can be read one step late, never stalling the host on the
    # step it has just queued. FSDP's and DeepSpeed's optimizers keep the read-then-update order.
    guard = _update_guard(optimizer) if accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED") else None
    pending: tuple[int, torch.Tensor] | None = None  # (step, [loss, tokens]) not yet read from the device

    def record(step: int, loss: float, tokens) -> None:
        """Log step `step`'s loss; stop the run on a non-finite one."""
        nonlocal stopped
        if not math.isfinite(loss):
            stopped = f"non-finite loss ({loss}) at step {step}"
            _finish(output, state, evals, metric, stopped, accelerator)
            raise TrainingError(f"{stopped}: stopped; {_kept(output)}. Lower the learning rate (train.lr={config.lr}).")
        state["losses"].append([step, round(loss, 6)])
        window_loss.append(loss)
        if writer is not None:
            writer.add_scalar("train/loss", loss, step)
        if bar is not None:
            elapsed = time.perf_counter() - window_start
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{float(tokens) / max(elapsed, 1e-9):,.0f}",
                            dev=f"{state['best_metric']:.4f}" if state["best_metric"] is not None else "-")

    def weights_finite(step: int) -> None:
        """Before anything is evaluated or saved: a finite loss can still come with an update
        that overflowed the weights (a huge learning rate), and such weights must not replace
        the last good checkpoint or the best prompt."""
        nonlocal stopped
        bad = [name for name, p in unit.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            stopped = f"non-finite weights ({bad[0]}) after step {step}"
            _finish(output, state, evals, metric, stopped, accelerator)
            raise TrainingError(f"{stopped}: stopped; {_kept(output)}. Lower the learning rate (train.lr={config.lr}).")

    stream = BatchStream(train_examples, config.batch_size, config.seed, config.bucket, state,
                         lambda examples: task.collate(model, examples), rank, world)
    while state["step"] < config.steps:
        step_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.grad_accum):
            batch, targets = stream.take()
            sync = nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(wrapped)
            if config.compile == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are free
            with sync, accelerator.autocast():
                loss = wrapped(batch, targets) / config.grad_accum
            accelerator.backward(loss)
            step_loss = step_loss + loss.detach().float()  # on the device: no wait between micro-batches
            window_tokens += task.num_tokens(batch) * world
        if state["step"] + 1 < config.steps:
            stream.prefetch()  # the next step's tokenization overlaps this step's backward
        if world > 1:  # every process logs, checks and stops on the same loss: the global batch's
            step_loss = accelerator.reduce(step_loss.reshape(1), "mean")
        step_loss = step_loss.reshape(())
        if guard is not None:
            guard.found_inf = (~torch.isfinite(step_loss)).float()  # a non-finite step updates nothing
        else:  # the loss is checked before the update: one wait for the device per step
            record(state["step"] + 1, float(step_loss), window_tokens)
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        if guard is not None:
            # Read the previous step's loss, long computed, while this step runs on the device:
            # the host never waits for the step it has just queued.
            if pending is not None:
                record(pending[0], *pending[1].tolist())
            pending = (state["step"], torch.stack([step_loss.float(), torch.as_tensor(window_tokens).float()]))
        last = state["step"] == config.steps
        evaluating = eval_examples and ((config.eval_every and state["step"] % config.eval_every == 0) or last)
        if pending is not None and (evaluating or last):  # what is logged, checked and saved is up to date
            record(pending[0], *pending[1].tolist())
            pending = None
        state["train_seconds"] += time.perf_counter() - step_start
        if evaluating or last:
            with _whole(wrapped, unit):
                weights_finite(state["step"])
        if evaluating:
            with _whole(wrapped, unit):  # every process: evaluation and saving see the whole prompt
                scores, _ = evaluate(model, task, eval_examples, config.eval_batch_size)
                elapsed = time.perf_counter() - window_start
                row = {"step": state["step"], "epoch": state["epoch"], "train_loss": sum(window_loss) / len(window_loss),
                       **scores, "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": float(window_tokens) / max(elapsed, 1e-9),
                       "train_seconds": state["train_seconds"]}
                window_loss, window_tokens, window_start = [], 0, time.perf_counter()
                evals.append(row)
                improved = state["best_metric"] is None or scores[metric] > state["best_metric"]
                if improved:
                    state["best_metric"], state["best_step"], state["bad_evals"] = scores[metric], state["step"], 0
                else:
                    state["bad_evals"] += 1
                if accelerator.is_main_process:
                    _append_metrics(output / "metrics.jsonl", row)
                    if writer is not None:
                        for k, v in scores.items():
                            writer.add_scalar(f"dev/{k}", v, state["step"])
                    if improved:
                        save_for_inference(model, task, output / "prompt",
                                           {**(metadata or {}), "step": state["step"], "dev": scores})
                _save_checkpoint(output / "checkpoint", unit, optimizer, state, write=accelerator.is_main_process)
            if config.patience and state["bad_evals"] >= config.patience:
                stopped = f"early stopping: no better dev {metric} in {config.patience} evaluations"
                break
        elif last:
            with _whole(wrapped, unit):
                if not eval_examples and accelerator.is_main_process:
                    save_for_inference(model, task, output / "prompt", {**(metadata or {}), "step": state["step"]})
                _save_checkpoint(output / "checkpoint", unit, optimizer, state, write=accelerator.is_main_process)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    summary = _finish(output, state, evals, metric, stopped, accelerator)
    return RunResult(state["best_metric"], state["best_step"], state["step"], stopped, summary)


def _kept(output: Path) -> str:
    """What a stopped run leaves to use: the last good checkpoint and best prompt, if any."""
    if (output / "checkpoint").is_dir():
        return f"the last good checkpoint ({output / 'checkpoint'}) and the best prompt ({output / 'prompt'}) are kept"
    return "no checkpoint had been written yet"


def _finish(output: Path, state, evals, metric, stopped, accelerator) -> dict[str, Any]:
    best = next((e for e in evals if e["step"] == state["best_step"]), None)
    summary = {"metric": metric, "best": best, "best_step": state["best_step"], "steps": state["step"],
               "train_seconds": round(state["train_seconds"], 3), "stopped": stopped,
               "processes": accelerator.num_processes}
    if accelerator.is_main_process:
        write_json_atomically(output / "metrics.json", summary)
        plot_curves([tuple(x) for x in state["losses"]], evals, metric, output / "curves.png")
    return summary


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    # Every row ends with a newline; a last line without one is the remnant of an append cut
    # short by a kill (or a full disk). Its evaluation reached no checkpoint, so a resumed run
    # redoes it: the fragment is dropped here (and by `_truncate_metrics` from the file).
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


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop evaluation lines written after the checkpoint (they will be redone)."""
    rows = [r for r in _read_metrics(path) if r["step"] <= step]
    write_file_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))


def _tensorboard(output: Path, config: TrainConfig):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(output / "tensorboard"))


def _progress(config: TrainConfig, done: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=done, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["TrainConfig", "TrainingError", "RunResult", "train", "evaluate", "epoch_batches", "save_for_inference",
           "plot_curves", "asdict"]
