"""The prompt's files: JSON + safetensors only, written atomically (`io.atomic`).

A prompt directory holds

    prompt_config.json       format version, method and its config, template, the base
                             model's identity, tensor shape (and a DePT prompt's
                             ``input_delta_shape``)
    prompt.safetensors       {"prompt": the collapsed inference tensor}, fp32 or bf16, and for
                             DePT {"input_delta": the additive input delta (S_max, D)}
    trainable.safetensors    the training-time module's state (optional, to resume)
    README.md                the model card (`io.model_card`)

and, when it was saved with its task (`folder.py`),

    task.json                the task's settings (`Task.to_config`)
    head.safetensors         the task head's weights (when it has any)

Every file name is defined here, once. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from ..architecture import BaseIdentity, base_identity, model_spec
from ..errors import BaseModelMismatchError, ConfigError, PromptFileError
from ..methods import build_module, config_class
from ..methods.collapsed import CollapsedPrompt
from .atomic import load_tensors, read_json_object, write_directory_atomically
from .model_card import model_card

FORMAT = "softprompt"
FORMAT_VERSION = 1
CONFIG_FILE = "prompt_config.json"
CARD_FILE = "README.md"
PROMPT_FILE = "prompt.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRAINABLE_FILE = "trainable.safetensors"
TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"
#: the tensor of ``prompt.safetensors`` holding a DePT prompt's additive input delta
INPUT_DELTA = "input_delta"
#: every file a prompt folder can hold (what a push replaces, what a copy from a URL takes)
PROMPT_FILES = (CONFIG_FILE, CARD_FILE, PROMPT_FILE, TRAINABLE_FILE, TASK_FILE, HEAD_FILE)


# -- save -----------------------------------------------------------------------------
def save_prompt(
    model,
    directory,
    *,
    save_trainable: bool = True,
    metadata: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extra_json: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> None:
    """Write `model`'s prompt to `directory` (see the module docstring for the layout).

    `extra_tensors` (file name -> tensors, written as safetensors) and `extra_json`
    (file name -> JSON value) land in the same atomic write: a task head and its
    settings travel with the prompt they were trained with. `dtype` is the storage of the
    inference tensor: ``float32`` or ``bfloat16`` (half the bytes; on SST-2 it changed no
    prediction, see docs/PERFORMANCE.md); it loads back as float32 either way.
    """
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    tensor = model.export().to(STORAGE_DTYPES[dtype]).contiguous()
    saved = {"prompt": tensor}
    delta = model.export_input_delta()
    if delta is not None:  # DePT's second inference tensor (S_max, D)
        saved[INPUT_DELTA] = delta.to(STORAGE_DTYPES[dtype]).contiguous()
    identity = model.identity
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": model.config.method,
        "kind": "deep" if model.deep else "input",
        "num_virtual_tokens": model.num_virtual_tokens,
        "template": model.template.source,
        "config": model.config.to_dict(),
        "tensor_shape": list(tensor.shape),
        "tensor_dtype": dtype,
        "base_model": {**identity.to_dict(), "name_or_path": getattr(model.base.config, "_name_or_path", "")},
        "metadata": dict(metadata or {}),
    }
    if delta is not None:  # only then: folders of the other methods are written as before
        config["input_delta_shape"] = list(delta.shape)
    trainable = None
    if save_trainable and not isinstance(model.prompt, CollapsedPrompt):
        trainable = {k: v.detach().float().contiguous().cpu() for k, v in model.prompt.state_dict().items()}

    card = model_card(config, (extra_json or {}).get(TASK_FILE))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        (tmp / CARD_FILE).write_text(card)
        save_file({k: v.cpu() for k, v in saved.items()}, str(tmp / PROMPT_FILE), metadata={"format": FORMAT})
        if trainable is not None:
            save_file(trainable, str(tmp / TRAINABLE_FILE), metadata={"format": FORMAT})
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        for name, value in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n")

    write_directory_atomically(Path(directory), write)


# -- load -----------------------------------------------------------------------------
def read_config(directory) -> dict[str, Any]:
    """Read and check ``prompt_config.json``.

    Raises:
        PromptFileError: missing file, invalid JSON (with line and column), missing
            field, or an unknown format / version.
    """
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise PromptFileError(f"{directory}: no such prompt directory")
    if not path.is_file():
        raise PromptFileError(f"{path}: missing; not a softprompt prompt directory")
    data = read_json_object(path)
    if data.get("format") != FORMAT:
        raise PromptFileError(f"{path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise PromptFileError(
            f"{path}: field 'format_version' is {version!r}; this softprompt reads version {FORMAT_VERSION}"
        )
    for key in ("method", "config", "tensor_shape", "base_model"):
        if key not in data:
            raise PromptFileError(f"{path}: missing field {key!r}")
    return data


def _saved_prompt(directory: Path, data: dict[str, Any], base, spec) -> torch.Tensor:
    """The folder's prompt tensor (float32), checked: saved for this base, of its recorded shape and dtype.

    Raises:
        BaseModelMismatchError: saved for another base (what differs).
        PromptFileError: a tensor missing, of another shape or dtype.
    """
    saved = data["base_model"]
    try:
        saved_identity = BaseIdentity(**{k: saved[k] for k in BaseIdentity.__dataclass_fields__})
    except (KeyError, TypeError) as e:
        raise PromptFileError(f"{directory / CONFIG_FILE}: field 'base_model' is incomplete ({e})") from None
    differences = saved_identity.differences(base_identity(base, spec))
    if differences:
        raise BaseModelMismatchError(
            f"{directory} was saved for another base model ({saved.get('name_or_path') or saved_identity.model_type}): "
            + "; ".join(differences)
        )
    tensor = load_tensors(directory / PROMPT_FILE).get("prompt")
    if tensor is None or list(tensor.shape) != list(data["tensor_shape"]):
        raise PromptFileError(
            f"{directory / PROMPT_FILE}: expected a tensor 'prompt' of shape {data['tensor_shape']}, "
            f"found {None if tensor is None else list(tensor.shape)}"
        )
    if tensor.dtype not in STORAGE_DTYPES.values():
        raise PromptFileError(f"{directory / PROMPT_FILE}: tensor 'prompt' is {tensor.dtype}; expected float32 or bfloat16")
    return tensor.float()  # bfloat16 storage widens exactly


def _saved_input_delta(directory: Path, data: dict[str, Any], hidden_size: int) -> torch.Tensor | None:
    """The folder's input delta (S_max, D) in float32, when its config records one
    (``input_delta_shape``: DePT); None for folders without (every other method, and
    folders written before DePT existed).

    Raises:
        PromptFileError: the recorded shape is not (S_max, D) of this base, or the tensor
            is missing or of another shape or dtype.
    """
    shape = data.get("input_delta_shape")
    if shape is None:
        return None
    where = directory / CONFIG_FILE
    if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape)
            or shape[1] != hidden_size):
        raise PromptFileError(f"{where}: field 'input_delta_shape' is {shape!r}; expected [S_max, {hidden_size}]")
    tensor = load_tensors(directory / PROMPT_FILE).get(INPUT_DELTA)
    if tensor is None or list(tensor.shape) != shape:
        raise PromptFileError(f"{directory / PROMPT_FILE}: expected a tensor {INPUT_DELTA!r} of shape {shape}, "
                              f"found {None if tensor is None else list(tensor.shape)}")
    if tensor.dtype not in STORAGE_DTYPES.values():
        raise PromptFileError(f"{directory / PROMPT_FILE}: tensor {INPUT_DELTA!r} is {tensor.dtype}; "
                              "expected float32 or bfloat16")
    return tensor.float()


def transferred_prompt(directory, base, *, deep: bool, P: int) -> torch.Tensor:
    """Another trained prompt of the same base as a new prompt's start (prompt transfer):
    its tensor, (P', D) for an input prompt or (L, 2, H_kv, P', D_head) for a deep one,
    resampled to P positions (linear interpolation along its token axis; as saved when P'
    is P).

    Raises:
        PromptFileError / BaseModelMismatchError: not a prompt folder of this base.
        ConfigError: a prompt of the other kind (input for deep, or deep for input).
    """
    directory = Path(directory)
    data = read_config(directory)
    if config_class(data["method"]).deep != deep:
        kinds = {True: "deep", False: "input"}
        raise ConfigError(f"init_prompt {directory} is a {kinds[not deep]} prompt ({data['method']}); a "
                          f"{kinds[deep]} prompt starts only from another {kinds[deep]} prompt")
    tensor = _saved_prompt(directory, data, base, model_spec(base))
    axis = 3 if deep else 0
    if tensor.shape[axis] == P:
        return tensor
    moved = tensor.movedim(axis, -1)  # (..., P')
    shape = moved.shape
    resampled = torch.nn.functional.interpolate(moved.reshape(1, -1, shape[-1]), size=P, mode="linear",
                                                align_corners=True)
    return resampled.reshape(*shape[:-1], P).movedim(-1, axis)


def load_prompt(cls, base, directory, tokenizer=None, *, trainable: bool = False):
    """Rebuild a `SoftPromptModel` from `directory` onto `base` (see `SoftPromptModel.from_pretrained`)."""
    directory = Path(directory)
    data = read_config(directory)
    cfg_path = directory / CONFIG_FILE
    try:
        config = config_class(data["method"]).from_dict(data["config"], source=f"{cfg_path}: field 'config'")
    except TypeError as e:
        raise PromptFileError(f"{cfg_path}: field 'config': {e}") from None
    spec = model_spec(base)
    tensor = _saved_prompt(directory, data, base, spec)
    delta = _saved_input_delta(directory, data, spec.hidden_size)
    if config.adds_input_delta and delta is None:
        raise PromptFileError(f"{cfg_path}: a {config.method} prompt without its field 'input_delta_shape' "
                              f"(and tensor {INPUT_DELTA!r} in {PROMPT_FILE})")
    device = base.get_input_embeddings().weight.device
    if trainable:
        state = load_tensors(directory / TRAINABLE_FILE)
        _, P = config.resolve()
        build_config = dataclasses.replace(config, init="random") if hasattr(config, "init") else config
        module = build_module(build_config, P, spec, base.get_input_embeddings().weight, tokenizer)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise PromptFileError(f"{directory / TRAINABLE_FILE}: does not match the {config.method} module ({e})") from None
    else:
        module = CollapsedPrompt(tensor, spec, deep=config.deep, input_delta=delta)
    return cls(base, config, tokenizer, prompt=module.to(device))
