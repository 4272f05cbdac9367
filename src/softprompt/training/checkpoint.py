"""Resumable checkpoints: everything needed to continue an interrupted run to bit-identical
final weights (on the CPU), in safetensors + JSON.

A checkpoint folder holds

    state.safetensors    the prompt's and the head's state ("prompt.*", "task.*"), the AdamW
                         moments ("optim.<param index>.<key>"), the RNG states ("rng.*")
    trainer_state.json   the loop's `TrainState` and the optimizer's param groups

written atomically (`io.atomic.write_directory_atomically`). Under FSDP 2 the sharded
parameters and optimizer states are gathered first (`whole`, `_full`): a collective, so
every process calls in, and one writes.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import TrainingError
from ..io.atomic import load_tensors, read_json_object, write_directory_atomically

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP 2
    FSDPModule = None

CHECKPOINT = "checkpoint"  # the folder in a run directory
STATE_FILE = "state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


def is_fsdp2(module) -> bool:
    """Whether `module` was sharded by FSDP 2 (`fully_shard`)."""
    return FSDPModule is not None and isinstance(module, FSDPModule)


@contextmanager
def whole(wrapped, unit: nn.Module) -> Iterator[None]:
    """Within the block the unit's own parameters are whole on every process.

    Under FSDP 2 the parameters that belong to no sharded block (the prompt, the head, the
    base's embeddings and final layers) are sharded tensors; evaluation and saving read them
    outside the unit's forward, so each is replaced by its gathered copy until the block
    ends (a collective: every process enters together). The base's sharded blocks gather
    their own weights whenever they run. Elsewhere (one process, DDP) nothing happens.
    """
    if not is_fsdp2(wrapped):
        yield
        return
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


def save_checkpoint(directory: Path, unit: nn.Module, optimizer, state: dict[str, Any], *,
                    write: bool = True) -> None:
    """Write `unit`'s (a `loop.PromptAndHead`) prompt and head, `optimizer`'s state and the
    loop's `state` to `directory`.

    Every process calls this (sharded optimizer states are gathered collectively);
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
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_FILE))
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n")

    write_directory_atomically(directory, write)


def load_checkpoint(directory: Path, unit: nn.Module, optimizer) -> dict[str, Any]:
    """Restore `unit`, `optimizer` and the RNG states from `directory`; returns the loop's
    state as saved (a dict of `TrainState`'s fields)."""
    path = directory / TRAINER_STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{directory}: no checkpoint to resume from ({TRAINER_STATE_FILE} missing)")
    state = read_json_object(path)
    tensors = load_tensors(directory / STATE_FILE)
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


__all__ = ["is_fsdp2", "whole", "save_checkpoint", "load_checkpoint"]
