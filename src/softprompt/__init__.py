"""softprompt: soft-prompt parameter-efficient fine-tuning on frozen transformers.

Prompt tuning, P-tuning, prefix tuning and P-tuning v2 behind one interface,
`SoftPromptModel`; each collapses for inference into an input table ``[P, D]`` or a
deep key/value prefix ``[L, 2, H_kv, P, D_head]``.
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

__all__ = [
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
