"""The training loop, on `accelerate`: the same code on the CPU, one GPU or several.

`train` runs a `Loop`: its phases are `step` (one optimiser step: micro-batches, backward,
update), `log` (a step's loss; a non-finite one stops the run), `evaluate` (dev metrics;
the best prompt so far saved) and `checkpoint`, over one typed `TrainState`; the summary
ends the run (`logs.RunLog.finish`). A run directory holds

    config.json        the resolved run configuration (written by the caller, `run.py`)
    metrics.jsonl      one line per evaluation                          (`logs.py`)
    metrics.json       the final summary                                (`logs.py`)
    curves.png         training loss and dev metric over steps          (`logs.py`)
    prompt/            the best prompt so far with its task head: what `eval` / `predict` /
                       `serve` load                                     (`folder.py`)
    checkpoint/        the latest full training state, for `--resume`   (`checkpoint.py`)
    tensorboard/       with ``train.report_to=tensorboard`` (W&B: wandb/)  (`logs.py`)

Every file is written atomically (temporary name, then rename), and the checkpoint holds
everything needed to continue an interrupted CPU run to bit-identical final weights.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import get_scheduler

from ..architecture import ModelKind, tensor_parallel_mesh
from ..errors import ConfigError, TrainingError
from ..folder import RUN_PROMPT, save_with_task
from ..io.atomic import remove_stale_temporaries
from ..packing import refusal
from ..tasks.base import Task
from .checkpoint import CHECKPOINT, is_fsdp2, load_checkpoint, save_checkpoint, whole
from .config import TrainConfig
from .evaluate import evaluate
from .fast_path import launched_processes, resolved_compile, resolved_lm_loss
from .logs import METRICS_LINES, RunLog, check_trackers, log, tracker_options, truncate_metrics
from .order import BatchStream


@dataclass
class TrainState:
    """Where a run stands: its checkpoint's ``trainer_state.json`` (with the optimizer's param
    groups), so a resumed run continues exactly where the interrupted one stopped.

    Attributes:
        step: optimiser steps done.
        epoch / batch_in_epoch: the position in the data order (`order.BatchStream`).
        best_metric / best_step: the best dev score so far and its step.
        bad_evals: evaluations since the best one (for `TrainConfig.patience`).
        losses: ``[step, loss]`` of every step so far (the curves).
        tokens: unused; kept so checkpoints keep their fields.
        train_seconds: wall time of the steps, evaluation excluded.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    losses: list[list[float]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0


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
    """The optimizer's groups: the prompt at ``lr``, DePT's low-rank pair at ``delta_lr``
    (the paper's two learning rates), the head at ``head_lr``."""
    delta = {id(p) for p in model.prompt.delta_parameters()}
    prompt = [p for p in model.prompt.parameters() if p.requires_grad and id(p) not in delta]
    groups = [{"params": prompt, "lr": config.lr, "name": "prompt"}]
    if not prompt:
        raise ConfigError("the prompt has no trainable parameters (a collapsed prompt? load it with trainable=True)")
    low_rank = [p for p in model.prompt.delta_parameters() if p.requires_grad]
    if low_rank:
        groups.append({"params": low_rank, "lr": config.delta_lr, "name": "input_delta"})
    head = [p for p in task.parameters() if p.requires_grad]
    if head:
        groups.append({"params": head, "lr": config.head_lr, "name": "head"})
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


@dataclass
class RunResult:
    """What `train` returns (also written to metrics.json)."""

    best_metric: float | None
    best_step: int | None
    steps: int
    stopped: str
    metrics: dict[str, Any] = field(default_factory=dict)


def _schedule(optimizer, config: TrainConfig, done: int):
    """The learning-rate schedule, advanced past the `done` steps of a resumed run (the
    schedule is a pure function of the step)."""
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.schedule]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(config.warmup_ratio * config.steps),
                              num_training_steps=config.steps)
    with warnings.catch_warnings():  # fast-forwarding the schedule, not skipping an optimiser step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            scheduler.step()
    return scheduler


def _accelerator(model, config: TrainConfig, output: Path) -> Accelerator:
    mixed = config.mixed_precision
    if mixed == "auto":
        # Autocast pays for fp32 weights; over a bf16 base it only adds casts (and runs
        # norms and softmaxes in fp32), so a half-precision base runs as it was loaded.
        on_gpu = model.device.type == "cuda"
        mixed = "bf16" if on_gpu and model.base.get_input_embeddings().weight.dtype == torch.float32 else "no"
    # A base on the CPU trains on the CPU; launched as several processes (torchrun), that is
    # accelerate's multi-CPU mode (gloo), which it enters only when told the run is on the CPU.
    accelerator = Accelerator(mixed_precision=mixed, cpu=model.device.type == "cpu", **tracker_options(config, output))
    if accelerator.distributed_type.name == "DEEPSPEED":
        # Tried (ZeRO-3, deepspeed 0.19.8, 2 x H200): the steps run, but DeepSpeed's partitioned
        # optimizer has no per-parameter AdamW moments for the checkpoint, so a run could not be
        # resumed; refused before any work rather than failing at the first checkpoint.
        raise ConfigError("DeepSpeed is not supported: shard a large base with FSDP 2 instead "
                          "(`accelerate launch --use_fsdp --fsdp_version 2 ...`; see docs/PERFORMANCE.md)")
    return accelerator


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
    run_config: dict[str, Any] | None = None,
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
        run_config: the resolved run configuration (config.json's dict), what the trackers
            of ``config.report_to`` record as the run's parameters; None: `config` alone.

    Raises:
        MissingExtraError: a tracker of ``config.report_to`` is not installed.
        TrainingError: empty training data, a non-finite loss (the last good checkpoint
            and best prompt are kept), or nothing to resume from.
    """
    config.validate()
    check_trackers(config)
    if not train_examples:
        raise TrainingError("no training examples")
    compiled = resolved_compile(config.compile, model.device, launched_processes(),
                                tensor_parallel_mesh(model.base) is not None, model.spec.kind is ModelKind.CAUSAL)
    options = {"mode": compiled} if isinstance(compiled, str) else None
    lm_loss = resolved_lm_loss(config.lm_loss, model.base, model.device, model.spec.kind is ModelKind.CAUSAL)
    with model.accelerated(compile=compiled is not False, checkpointing=config.gradient_checkpointing,
                           compile_options=options, lm_loss=lm_loss, float8=config.float8):
        loop = Loop(model, task, train_examples, eval_examples, config, output, resume=resume, metadata=metadata,
                    run_config=run_config)
        return loop.run()


class Loop:
    """One training run (see the module docstring): built ready to step, from scratch or
    from ``output/checkpoint``; `run` steps it to the end."""

    def __init__(self, model, task: Task, train_examples: Sequence[dict], eval_examples: Sequence[dict] | None,
                 config: TrainConfig, output: str | os.PathLike, *, resume: bool, metadata: dict[str, Any] | None,
                 run_config: dict[str, Any] | None = None):
        self.model, self.task, self.config = model, task, config
        self.eval_examples, self.metadata = eval_examples, metadata or {}
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)  # a new folder, from Python (the CLI made it already)
        self.accelerator = accelerator = _accelerator(model, config, self.output)
        set_seed(config.seed)
        task.bind(model)
        model.train()
        task.train()
        self.unit = PromptAndHead(model, task)
        optimizer = make_optimizer(model, task, config)
        self.state = TrainState()
        if resume:
            self.state = TrainState(**load_checkpoint(self.output / CHECKPOINT, self.unit, optimizer))
            if accelerator.is_main_process:
                truncate_metrics(self.output / METRICS_LINES, self.state.step)
                remove_stale_temporaries(self.output)  # a checkpoint or prompt half-written by the killed run
        self.scheduler = _schedule(optimizer, config, self.state.step)
        mesh = tensor_parallel_mesh(model.base)
        self.split = mesh.size() if mesh is not None else 1  # processes that share one split base
        if self.split > 1:
            # The base's weights are split, not copies: data parallelism must neither broadcast
            # nor reduce them (each process already holds the whole prompt gradient: `local_kv_heads`).
            self.unit._ddp_params_and_buffers_to_ignore = _base_state_names(self.unit, model.base)
        self.wrapped, self.optimizer = accelerator.prepare(self.unit, optimizer)
        if accelerator.distributed_type.name == "FSDP" and not is_fsdp2(self.wrapped):
            # FSDP 1 flattens the prompt into shards that saving and evaluation cannot read whole.
            raise ConfigError("FSDP version 1 is not supported: launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`")
        self.world, rank = accelerator.num_processes, accelerator.process_index
        self.logs = RunLog(self.output, config, self.state.step, accelerator, run_config)
        self.metric = task.metric
        self.stopped = "max steps"
        # With a fused AdamW the update of a non-finite step is skipped on the device (the kernel's
        # found_inf flag), so the loss can be read one step late, never stalling the host on the
        # step it has just queued. FSDP's and DeepSpeed's optimizers keep the read-then-update order.
        distributed = accelerator.distributed_type.name
        self.guard = _update_guard(self.optimizer) if distributed not in ("FSDP", "DEEPSPEED") else None
        self.pending: tuple[int, torch.Tensor] | None = None  # (step, [loss, tokens]) not yet read from the device
        # processes that split one base take the same rows: the batch is shared by data-parallel groups
        self.stream = BatchStream(train_examples, config.batch_size, config.seed, config.bucket, self.state,
                                  _collation(model, task, config), rank // self.split, self.world // self.split)

    def run(self) -> RunResult:
        """Step to `config.steps` (or early stopping), evaluating and checkpointing on the way."""
        try:
            self.run_steps()
        finally:  # also when the run stops or fails: the trackers' runs end (and say so)
            self.logs.close()
        summary = self.logs.finish(self.state, self.metric, self.stopped, self.accelerator.num_processes)
        return RunResult(self.state.best_metric, self.state.best_step, self.state.step, self.stopped, summary)

    def run_steps(self) -> None:
        """The steps, evaluations and checkpoints of `run`."""
        state, config = self.state, self.config
        while state.step < config.steps:
            step_start = time.perf_counter()
            self.step()
            last = state.step == config.steps
            evaluating = bool(self.eval_examples) and bool(
                (config.eval_every and state.step % config.eval_every == 0) or last)
            if self.pending is not None and (evaluating or last):  # what is logged, checked and saved is up to date
                self.log_pending()
            state.train_seconds += time.perf_counter() - step_start
            if evaluating or last:
                with whole(self.wrapped, self.unit):
                    self.check_weights()
            if evaluating:
                with whole(self.wrapped, self.unit):  # every process: evaluation and saving see the whole prompt
                    self.evaluate()
                    self.checkpoint()
                if config.patience and state.bad_evals >= config.patience:
                    self.stopped = f"early stopping: no better dev {self.metric} in {config.patience} evaluations"
                    return
            elif last:
                with whole(self.wrapped, self.unit):
                    if not self.eval_examples and self.accelerator.is_main_process:
                        save_with_task(self.model, self.task, self.output / RUN_PROMPT,
                                       {**self.metadata, "step": state.step})
                    self.checkpoint()

    # -- step ---------------------------------------------------------------------------
    def step(self) -> None:
        """One optimiser step. Its loss is recorded before the update, or (with the update
        guard) one step later, while the next step runs."""
        config, state = self.config, self.state
        step_loss = self.forward_backward()
        if state.step + 1 < config.steps:
            self.stream.prefetch()  # the next step's tokenization overlaps this step's backward
        if self.world > 1:  # every process logs, checks and stops on the same loss: the global batch's
            step_loss = self.accelerator.reduce(step_loss.reshape(1), "mean")
        step_loss = step_loss.reshape(())
        if self.guard is not None:
            self.guard.found_inf = (~torch.isfinite(step_loss)).float()  # a non-finite step updates nothing
        else:  # the loss is checked before the update: one wait for the device per step
            self.log(state.step + 1, float(step_loss), self.logs.window_tokens)
        if config.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.accelerator.clip_grad_norm_(params, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        state.step += 1
        if self.guard is not None:
            # Read the previous step's loss, long computed, while this step runs on the device:
            # the host never waits for the step it has just queued.
            if self.pending is not None:
                self.log_pending()
            tokens = torch.as_tensor(self.logs.window_tokens).float()
            self.pending = (state.step, torch.stack([step_loss.float(), tokens]))

    def forward_backward(self) -> torch.Tensor:
        """The step's micro-batches through the unit and back; their mean loss, on the device."""
        config, accelerator = self.config, self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.grad_accum):
            batch, targets = self.stream.take()
            sync = nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(self.wrapped)
            if config.compile == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are free
            with sync, accelerator.autocast():
                loss = self.wrapped(batch, targets) / config.grad_accum
            accelerator.backward(loss)
            step_loss = step_loss + loss.detach().float()  # on the device: no wait between micro-batches
            self.logs.window_tokens += self.task.num_tokens(batch) * (self.world // self.split)
        return step_loss

    # -- log ----------------------------------------------------------------------------
    def log(self, step: int, loss: float, tokens) -> None:
        """Log step `step`'s loss; stop the run on a non-finite one."""
        if not math.isfinite(loss):
            self.stop(f"non-finite loss ({loss}) at step {step}")
        self.logs.loss(self.state, step, loss, tokens)

    def log_pending(self) -> None:
        """Log the step whose loss is still on the device (the update guard's one-step lag)."""
        step, values = self.pending
        self.pending = None
        self.log(step, *values.tolist())

    def check_weights(self) -> None:
        """Before anything is evaluated or saved: a finite loss can still come with an update
        that overflowed the weights (a huge learning rate), and such weights must not replace
        the last good checkpoint or the best prompt."""
        bad = [name for name, p in self.unit.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            self.stop(f"non-finite weights ({bad[0]}) after step {self.state.step}")

    def stop(self, reason: str) -> None:
        """End the run on `reason` (the summary written, the last good files kept): raises."""
        self.stopped = reason
        self.logs.finish(self.state, self.metric, reason, self.accelerator.num_processes)
        raise TrainingError(f"{reason}: stopped; {_kept(self.output)}. Lower the learning rate (train.lr={self.config.lr}).")

    # -- evaluate and checkpoint ----------------------------------------------------------
    def evaluate(self) -> None:
        """Dev metrics at this step (one metrics line); an improvement saves the prompt."""
        state, metric = self.state, self.metric
        scores, _ = evaluate(self.model, self.task, self.eval_examples, self.config.eval_batch_size)
        row = self.logs.evaluation(state, scores, self.optimizer.param_groups[0]["lr"])
        improved = state.best_metric is None or scores[metric] > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.bad_evals = scores[metric], state.step, 0
        else:
            state.bad_evals += 1
        if self.accelerator.is_main_process:
            self.logs.write_evaluation(row, scores)
            if improved:
                save_with_task(self.model, self.task, self.output / RUN_PROMPT,
                               {**self.metadata, "step": state.step, "dev": scores})

    def checkpoint(self) -> None:
        """The full training state to ``checkpoint/`` (every process gathers; the main one writes)."""
        save_checkpoint(self.output / CHECKPOINT, self.unit, self.optimizer, asdict(self.state),
                        write=self.accelerator.is_main_process)


def _collation(model, task: Task, config: TrainConfig):
    """examples -> (batch, targets) of one micro-batch: the task's, packed with ``train.packing``
    where the model can run packed forwards (else padded, said in one log line)."""
    if not config.packing:
        return lambda examples: task.collate(model, examples)
    why = refusal(model.base, model.spec)
    if why is not None:
        log.warning("train.packing: %s; training on padded batches", why)
        return lambda examples: task.collate(model, examples)

    def packed(examples):
        batch, targets = task.collate(model, examples)
        return batch.packed(config.pack_tokens), targets

    return packed


def _base_state_names(unit: nn.Module, base: nn.Module) -> list[str]:
    """The names, in `unit`, of the base model's parameters and buffers."""
    own = {id(t) for t in (*base.parameters(), *base.buffers())}
    return [n for n, t in (*unit.named_parameters(), *unit.named_buffers()) if id(t) in own]


def _kept(output: Path) -> str:
    """What a stopped run leaves to use: the last good checkpoint and best prompt, if any."""
    if (output / CHECKPOINT).is_dir():
        return f"the last good checkpoint ({output / CHECKPOINT}) and the best prompt ({output / RUN_PROMPT}) are kept"
    return "no checkpoint had been written yet"


__all__ = ["TrainState", "RunResult", "Loop", "PromptAndHead", "make_optimizer", "train"]
