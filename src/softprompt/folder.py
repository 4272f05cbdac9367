"""A saved prompt folder with its task head: find it, save it, load it, describe it.

The folder is the prompt's files (`io.prompt`: ``prompt_config.json``, ``prompt.safetensors``,
``trainable.safetensors``, the model card) plus the task's (``task.json``, ``head.safetensors``),
written in one atomic step. A run directory holds one under ``prompt/``: the best prompt of
the run. What reads one: `eval`, `predict`, `export`, `info`, the server's prompt bank and the
end-of-run test score; what writes one: the training loop's best-prompt saves and
`transformers.Trainer`'s saves.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from .base_models import load_base, resolve_device
from .errors import ConfigError, PromptFileError, SoftPromptError, first_line
from .io.atomic import load_tensors, read_json_object
from .io.hub import resolve_prompt_source
from .io.prompt import CONFIG_FILE, HEAD_FILE, PROMPT_FILE, TASK_FILE, TRAINABLE_FILE, read_config
from .model import SoftPromptModel
from .tasks import Task, task_from_config

RUN_PROMPT = "prompt"  # a run directory's best prompt folder


# -- find -------------------------------------------------------------------------------
def prompt_directory(path: str | Path) -> Path:
    """A run directory or a prompt folder -> the prompt folder; a string of the form
    ``user/repo[@revision][:subdir]`` with no local folder there is fetched from the Hugging
    Face Hub first (`io.hub.resolve_prompt_source`)."""
    path = resolve_prompt_source(path)
    if (path / RUN_PROMPT / CONFIG_FILE).exists():
        return path / RUN_PROMPT
    return path


def has_task(directory: Path) -> bool:
    """Whether the prompt folder was saved with its task (``task.json``)."""
    return (Path(directory) / TASK_FILE).exists()


# -- save -------------------------------------------------------------------------------
def save_with_task(model: SoftPromptModel, task: Task, directory: Path, metadata: dict[str, Any]) -> None:
    """The prompt with its task head and settings, as `eval` / `predict` / `serve` load it."""
    model.save_pretrained(
        directory,
        metadata=metadata,
        extra_tensors={HEAD_FILE: task.state_dict()} if len(task.state_dict()) else {},
        extra_json={TASK_FILE: task.to_config()},
    )


# -- load -------------------------------------------------------------------------------
def load_with_task(directory: Path, base, tokenizer) -> tuple[SoftPromptModel, Task]:
    """A saved prompt folder and its task head on an already loaded base model (eval mode)."""
    sp_model = SoftPromptModel.from_pretrained(base, directory, tokenizer=tokenizer).eval()
    task_file = directory / TASK_FILE
    if not task_file.exists():
        raise ConfigError(f"{task_file}: missing; this prompt was saved without a task")
    with unreadable_as(task_file, "cannot be read as this prompt's task head"):
        task = task_from_config(read_json_object(task_file))
        task.bind(sp_model)
        if (directory / HEAD_FILE).exists():
            task.load_state_dict(load_tensors(directory / HEAD_FILE))
    task.eval()
    return sp_model, task


@contextmanager
def unreadable_as(path: Path, what: str) -> Iterator[None]:
    """Whatever a loader fails with on a file it cannot read (a hand-edited task.json without
    a key it needs, a value of the wrong type, a head of another shape) becomes a
    PromptFileError naming `path`, not a traceback from inside a task class (the server
    answers it 422, the CLI prints it as one error line)."""
    try:
        yield
    except SoftPromptError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as e:
        problem = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) and e.args else \
            f"{type(e).__name__}: {first_line(e)}"
        raise PromptFileError(f"{path}: {what} ({problem})") from e


def load_recorded_base(path: str | Path, *, model: str | None = None, device: str = "auto"):
    """The base model a saved prompt was trained on (or `model`), loaded on `device`
    (auto: the GPU when there is one).

    Returns:
        (prompt folder, its prompt_config.json content, base model, tokenizer).
    """
    directory = prompt_directory(path)
    saved = read_config(directory)
    name = model or saved["metadata"].get("model") or saved["base_model"].get("name_or_path")
    if not name:
        raise ConfigError(f"{directory}: the base model is not recorded; pass --model")
    base, tokenizer = load_base(name)
    base.to(resolve_device(device))
    return directory, saved, base, tokenizer


def load_trained(path: str | Path, *, model: str | None = None):
    """Load a trained prompt with its task head, on the base model it was trained on.

    Args:
        path: a run directory or its ``prompt/`` folder.
        model: the base model (alias / path); default: the one it was trained on.

    Returns:
        (SoftPromptModel, Task, metadata dict).
    """
    directory, saved, base, tokenizer = load_recorded_base(path, model=model)
    sp_model, task = load_with_task(directory, base, tokenizer)
    sp_model.max_length = saved["metadata"].get("max_length")  # rows as long as in training
    return sp_model, task, saved["metadata"]


# -- describe ---------------------------------------------------------------------------
def _tensor_header(path: Path) -> dict[str, list[int]]:
    """Names and shapes of the tensors in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PromptFileError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def prompt_info(directory: Path) -> dict[str, Any]:
    """What `softprompt info` reports about a saved prompt directory.

    Args:
        directory: a folder written by `SoftPromptModel.save_pretrained`.

    Returns:
        A JSON-serialisable dict: method, kind, template, num_virtual_tokens, the stored
        tensor's shape and parameter count, whether trainable state is present (and its
        parameter count), the size on disk in bytes, the base model's identity, metadata.

    Raises:
        PromptFileError: not a prompt directory, or its files are unreadable.
    """
    directory = Path(directory)
    data = read_config(directory)
    tensors = _tensor_header(directory / PROMPT_FILE)
    if "prompt" not in tensors:
        raise PromptFileError(f"{directory / PROMPT_FILE}: has no tensor 'prompt'")
    shape = tensors["prompt"]
    trainable_path = directory / TRAINABLE_FILE
    trainable = None
    if trainable_path.is_file():
        trainable = sum(math.prod(s) for s in _tensor_header(trainable_path).values())
    base = data["base_model"]
    identity = ("model_type", "name_or_path", "architecture", "num_layers", "hidden_size", "num_key_value_heads",
                "head_dim", "vocab_size", "embedding_fingerprint")
    delta_shape = tensors.get("input_delta")  # DePT's second inference tensor (S_max, D)
    info = {
        "path": str(directory),
        "method": data["method"],
        "kind": data.get("kind", "deep" if len(shape) == 5 else "input"),
        "template": data.get("template"),
        "num_virtual_tokens": data.get("num_virtual_tokens"),
        "tensor_shape": shape,
        "parameters": math.prod(shape) + (math.prod(delta_shape) if delta_shape else 0),
        "trainable_state": trainable is not None,
        "trainable_parameters": trainable,
        "size_bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
        "base_model": {key: base.get(key) for key in identity},
        "metadata": data.get("metadata") or {},
    }
    if delta_shape is not None:  # only then: the other methods' info reads as before
        info["input_delta_shape"] = delta_shape
    return info


__all__ = ["RUN_PROMPT", "prompt_directory", "has_task", "save_with_task", "load_with_task", "load_recorded_base",
           "load_trained", "prompt_info"]
