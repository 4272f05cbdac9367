"""softprompt: soft-prompt parameter-efficient fine-tuning on frozen transformers.

Prompt tuning, P-tuning, prefix tuning and P-tuning v2 behind one interface,
`SoftPromptModel`; each collapses for inference into an input table ``[P, D]`` or a
deep key/value prefix ``[L, 2, H_kv, P, D_head]``.

The layers, each importing only those below it:

    template, encode         the template language; examples -> a typed PromptBatch
    architecture, inject     what a base looks like; the one place prompts enter it
    forward, model           forwards with prompts; SoftPromptModel (methods/: one file per method)
    io/, folder              a prompt's files on disk; a saved prompt folder with its task head
    data/, tasks/            examples; heads, losses, metrics (each task says what it can do)
    training/                the training wing: config, order, loop, checkpoints, logs, evaluation, runs
    serve/                   the prompt bank, mixed batches, the engine (tokens), text, the HTTP app
    cli                      `softprompt ...`, a thin layer over the above

`serve/` imports nothing of `training/`; a new task is one file in `tasks/`.
"""

from .architecture import BaseIdentity, ModelKind, ModelSpec, model_spec
from .encode import PromptBatch
from .errors import (
    BaseModelMismatchError,
    ConfigError,
    EncodingError,
    InputTooLongError,
    PromptFileError,
    SoftPromptError,
    TemplateError,
    UnsupportedModelError,
)
from .methods import PrefixTuningConfig, PromptConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from .model import SoftPromptModel, SoftPromptOutput
from .template import Template, parse_template

__version__ = "0.1.0"

#: what users call, imported on first use (`import softprompt` stays light: serving needs
#: none of training's modules, and the reverse)
_LAZY = {"load_base": ".base_models", "train": ".training.run", "RunConfig": ".training.config",
         "PromptBank": ".serve.bank", "Engine": ".serve.engine", "Request": ".serve.engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")

__all__ = [
    "load_base",
    "train",
    "RunConfig",
    "PromptBank",
    "Engine",
    "Request",
    "SoftPromptModel",
    "SoftPromptOutput",
    "PromptBatch",
    "PromptConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PTuningV2Config",
    "Template",
    "parse_template",
    "ModelKind",
    "ModelSpec",
    "BaseIdentity",
    "model_spec",
    "SoftPromptError",
    "ConfigError",
    "TemplateError",
    "EncodingError",
    "InputTooLongError",
    "UnsupportedModelError",
    "PromptFileError",
    "BaseModelMismatchError",
    "__version__",
]
