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

from .errors import (  # no torch: the command line's errors, and every module's
    BaseModelMismatchError,
    ConfigError,
    EncodingError,
    InputTooLongError,
    PromptFileError,
    SoftPromptError,
    TemplateError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

#: every other public name, imported on first use: `import softprompt` (and so `softprompt
#: --help`) loads neither torch nor transformers until a name that needs them is used;
#: serving then loads none of training's modules, and the reverse
_LAZY = {
    **dict.fromkeys(["BaseIdentity", "ModelKind", "ModelSpec", "model_spec"], ".architecture"),
    "PromptBatch": ".encode",
    **dict.fromkeys(["PrefixTuningConfig", "PromptConfig", "PromptTuningConfig", "PTuningConfig", "PTuningV2Config",
                     "DePTConfig"], ".methods"),
    **dict.fromkeys(["SoftPromptModel", "SoftPromptOutput"], ".model"),
    **dict.fromkeys(["Template", "parse_template"], ".template"),
    "load_base": ".base_models", "train": ".training.run", "RunConfig": ".training.config",
    "PromptBank": ".serve.bank", "Engine": ".serve.engine", "Request": ".serve.engine",
}


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
    "DePTConfig",
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
