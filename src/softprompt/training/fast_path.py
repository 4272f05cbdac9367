"""What a training run picks by default for speed, decided before it starts: whether the
base's blocks are compiled (``train.compile=auto``, `resolved_compile`), from the device,
the processes of the launch (`launched_processes`) and the model's kind; and which kernel
computes a causal LM's token loss (``train.lm_loss=auto``, `resolved_lm_loss`)."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import ConfigError
from ..extras import require
from ..loss import fused_loss_refusal
from .logs import log


def launched_processes() -> int:
    """The processes of this run, before accelerate's `Accelerator` exists (where
    ``train.compile=auto`` is decided): the process group's size if one is up already,
    else what the launcher exported: ``WORLD_SIZE`` (torchrun, accelerate launch,
    DeepSpeed) or ``OMPI_COMM_WORLD_SIZE`` (mpirun); 1 when none says."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def resolved_compile(setting: bool | str, device: torch.device, processes: int = 1,
                     tensor_parallel: bool = False, causal: bool = True) -> bool | str:
    """``train.compile``'s value for this run: `setting` itself, or for ``auto`` True (the
    base's blocks compiled, `torch.compile`'s default mode) for a causal LM on one CUDA
    device and False elsewhere, said in one log line.

    Why compiled by default on a GPU, measured on an H100 (`bench.train.throughput`, every
    method, 20 virtual tokens, `bench/results/train_throughput.json`): 1B Llama shape,
    16 x 512, 1.35-1.41x the eager step's tokens/s with the LM loss and 1.56-1.63x with the
    classification loss; 8B, 1.30-1.34x; GPT-2 124M mixed (0.88-1.25x: its steps are
    bound by launching kernels, where ``reduce-overhead`` pays most). Regional
    compilation compiles one block: the first compiled step took 0.2-5 s in most rows of
    that run, 28-82 s for prefix tuning's projection at 1B. Eager on a CPU (compiling costs
    more than it saves there), and for encoders, encoder-decoders, several processes or a
    tensor-parallel base (not measured compiled); ``train.compile=true`` asks for it anyway.
    """
    if setting != "auto":
        return setting
    if device.type == "cuda" and processes == 1 and not tensor_parallel and causal:
        # shown (a warning's level, where the loop's info is not): the first steps take longer
        log.warning("train.compile=auto: the base's blocks compiled (regional; the first steps include the "
                    "compilation; train.compile=false runs eager)")
        return True
    where = ("a tensor-parallel base" if tensor_parallel else f"{processes} processes" if processes > 1
             else f"the {device.type.upper()}" if device.type != "cuda" else "an encoder or encoder-decoder")
    say = log.warning if device.type == "cuda" else log.info  # on a GPU, the speed a user might expect is not there
    say("train.compile=auto: eager on %s (train.compile=true compiles anyway)", where)
    return False


def resolved_lm_loss(setting: str, base, device: torch.device, causal: bool = True) -> str:
    """``train.lm_loss``'s kernel for this run (`loss.LM_LOSSES`): `setting` itself, or for
    ``auto`` liger-kernel's fused linear cross-entropy where it can stand for the LM head
    and cross-entropy (a causal LM on a CUDA device, `loss.fused_loss_refusal`) and is
    installed, else softprompt's chunks, said in one log line on a GPU.

    Why liger by default on a GPU, measured on an H100 (`bench.train.throughput`, 1B Llama
    shape, 16 x 512, prompt tuning, the LM loss at every position:
    `bench/results/train_lm_kernels_h100.json`): 58.6k tokens/s against the chunks' 53.6k
    (1.09x) with 12.8 against 13.5 GiB of peak memory; cut-cross-entropy 56.6k. Equal to
    the chunks in loss and gradients (`tests/test_loss_kernels.py`, on a GPU).

    Raises:
        ConfigError: ``liger`` asked for where it cannot run (the reason named).
        MissingExtraError: ``liger`` asked for and liger-kernel is not installed.
    """
    if setting == "chunks" or not causal:
        return "chunks"
    why = fused_loss_refusal(base, device)
    if setting == "liger":
        if why is not None:
            raise ConfigError(f"train.lm_loss=liger: {why} (train.lm_loss=chunks computes the same loss)")
        require("liger_kernel", "liger", "train.lm_loss=liger")
        return "liger"
    if why is None and importlib.util.find_spec("liger_kernel") is None:
        why = "liger-kernel is not installed (pip install 'softprompt[liger]')"
    if why is None:
        log.info("train.lm_loss=auto: liger-kernel's fused LM head and cross-entropy (train.lm_loss=chunks: "
                 "softprompt's chunks)")
        return "liger"
    if device.type == "cuda":  # on a CPU the chunks are the only kernel: nothing to say
        log.info("train.lm_loss=auto: softprompt's chunked LM loss: %s", why)
    return "chunks"


__all__ = ["launched_processes", "resolved_compile", "resolved_lm_loss"]
