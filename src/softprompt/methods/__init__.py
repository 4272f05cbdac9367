"""The methods of the soft-prompt family, by name: the four of DESIGN.md and DePT."""

from __future__ import annotations

from .base import PromptConfig, PromptModule
from .dept import DePT, DePTConfig
from .p_tuning import PTuning, PTuningConfig
from .prefix_tuning import PrefixTuning, PrefixTuningConfig, PTuningV2Config
from .prompt_tuning import PromptTuning, PromptTuningConfig
from ..errors import ConfigError

CONFIGS: dict[str, type[PromptConfig]] = {
    c.method: c for c in (PromptTuningConfig, PTuningConfig, PrefixTuningConfig, PTuningV2Config, DePTConfig)
}
_MODULES = {
    PromptTuningConfig: PromptTuning,
    PTuningConfig: PTuning,
    PrefixTuningConfig: PrefixTuning,
    PTuningV2Config: PrefixTuning,
    DePTConfig: DePT,
}


def config_class(method: str) -> type[PromptConfig]:
    try:
        return CONFIGS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(CONFIGS)}") from None


def build_module(config: PromptConfig, P: int, spec, embeddings, tokenizer=None) -> PromptModule:
    """Instantiate the module of `config` for a base model of `spec`."""
    return _MODULES[type(config)](config, P, spec, embeddings, tokenizer)


__all__ = [
    "CONFIGS", "PromptConfig", "PromptModule", "PromptTuningConfig", "PromptTuning", "PTuningConfig", "PTuning",
    "PrefixTuningConfig", "PTuningV2Config", "PrefixTuning", "DePTConfig", "DePT", "config_class", "build_module",
]
