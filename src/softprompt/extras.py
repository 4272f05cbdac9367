"""Optional features and the extras that install them (pyproject's
``[project.optional-dependencies]``): the core install trains, evaluates, saves and loads
prompts; serving, Hugging Face datasets, NER metrics, plots and the experiment trackers
need their extra.

    pip install 'softprompt[serve]'      # or [all]: every extra
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

#: extra -> (distribution, module) of each package it installs
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "serve": (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus-client", "prometheus_client"),
              ("httptools", "httptools"), ("uvloop", "uvloop"),  # uvicorn's fast parser and loop; optional at run time
              ("orjson", "orjson")),  # completions' JSON (`openai_api.FastJSON`); optional at run time
    "hf": (("datasets", "datasets"),),
    "ner": (("seqeval", "seqeval"),),
    "plots": (("matplotlib", "matplotlib"),),
    "models": (("gguf", "gguf"),),
    # experiment trackers (`train.report_to`), one extra each: together they add ~215 MB.
    # MLflow's logging client (mlflow-skinny, 96 MB) rather than mlflow (345 MB: its server and UI).
    # Comet has no extra (see `training.logs.BY_HAND`).
    "tensorboard": (("tensorboard", "tensorboard"),),
    "wandb": (("wandb", "wandb"),),
    "mlflow": (("mlflow-skinny", "mlflow"),),
    "ray": (("ray", "ray"),),  # Ray Serve replicas (`serve.ray`): ray[serve] (~80 MB wheel and its serve packages)
    "eval": (("lm-eval", "lm_eval"),),
    # the fused LM loss on GPUs (``train.lm_loss``); its Triton kernels need a CUDA build of torch
    "liger": (("liger-kernel", "liger_kernel"),),  # lm-evaluation-harness against `softprompt serve` (its API model types)
    "test": (("pytest", "pytest"), ("hypothesis", "hypothesis"), ("peft", "peft"), ("httpx", "httpx"),
             ("openai", "openai")),
}

#: extras that ``[all]`` leaves out: what they install works on CUDA devices alone
GPU_ONLY = ("liger",)


class MissingExtraError(ConfigError):
    """A feature needs an optional package that is not installed (names the extra)."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, imported for `feature`.

    Raises:
        MissingExtraError: it is not installed; the message names the extra to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{feature} needs the {module.split('.')[0]!r} package: "
                                f"pip install 'softprompt[{extra}]'") from None


def require_extra(extra: str, feature: str) -> None:
    """Every package of `extra`, for `feature` (before any slow work starts)."""
    for _, module in EXTRAS[extra]:
        require(module, extra, feature)


def environment() -> dict[str, str]:
    """What `softprompt env` prints: versions, the device, and each extra installed or not."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    rows = {"softprompt": installed("softprompt") or "?", "python": platform.python_version(),
            "platform": platform.platform()}
    for name in ("torch", "transformers", "accelerate", "safetensors", "huggingface_hub", "tokenizers"):
        rows[name] = installed(name) or "missing"
    if torch.cuda.is_available():
        rows["device"] = f"cuda: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        rows["device"] = f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    for extra, packages in EXTRAS.items():
        found = {dist: installed(dist) for dist, _ in packages}
        missing = [n for n, v in found.items() if v is None]
        state = "installed" if not missing else f"missing {', '.join(missing)} (pip install 'softprompt[{extra}]')"
        rows[f"extra {extra}"] = f"{state}: " + ", ".join(f"{n} {v}" for n, v in found.items() if v)
    return rows


__all__ = ["EXTRAS", "GPU_ONLY", "MissingExtraError", "environment", "require", "require_extra"]
