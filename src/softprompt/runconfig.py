"""A run's configuration: dataclasses in code, YAML on disk, ``--set key=value`` at the CLI.

Keys are dotted paths: top-level run settings (``model``, ``method``, ``template``, ...),
``train.<field>`` (`TrainConfig`), ``prompt.<field>`` (the method config's own fields,
e.g. ``prompt.encoder=mlp``) and ``task.<field>`` (e.g. ``task.pool=mean``). An unknown
key is refused with the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import CONFIGS
from .base_models import DTYPES
from .train import TrainConfig

METHOD_ALIASES = {"prompt_tuning": "prompt-tuning", "p_tuning": "p-tuning", "prefix_tuning": "prefix-tuning",
                  "p_tuning_v2": "p-tuning-v2", "ptuning": "p-tuning", "ptuning-v2": "p-tuning-v2"}
HEADS = ("auto", "verbalizer", "linear")


@dataclass
class RunConfig:
    """Everything `softprompt train` needs.

    Attributes:
        model: alias (``minilm``, ``smollm2-135m``, ``bert-tiny-mlm``), local path or hub id.
        method: prompt-tuning | p-tuning | prefix-tuning | p-tuning-v2.
        task: a recipe name (``sst2``, ``rte``, ``fewglue-cb``, ``wnut17``, ``lama-trex``, ...)
            or a generic kind: classification | ner | generation.
        output: the run directory.
        train_file / eval_file / test_file: data files (override the recipe's).
        data_root: where recipes find their files (default: $SOFTPROMPT_DATA, ../shared/data).
        template: the template (default: the recipe's for this model and method).
        num_virtual_tokens: P (default 20 for deep methods, or the template's slots).
        labels: label names, or ``label:word`` pairs for a verbalizer.
        fields: file column -> template field (``sentence:text``).
        head: auto (verbalizer for input methods on a model with an LM head, else a
            linear head), verbalizer, linear.
        max_length: most tokens per row, virtual tokens included.
        device: where the base model trains: auto (the GPU when there is one), cpu, cuda, cuda:N.
        dtype: the frozen base's dtype: auto (the checkpoint's; on a GPU the loop autocasts
            matmuls to bfloat16), float32, bfloat16, float16. Prompt and head train in float32.
        prompt / task_options: extra fields of the method config / the task.
    """

    model: str = "minilm"
    method: str = "p-tuning-v2"
    task: str = "sst2"
    output: str = "runs/run"
    train_file: str | None = None
    eval_file: str | None = None
    test_file: str | None = None
    data_root: str | None = None
    template: str | None = None
    num_virtual_tokens: int | None = None
    labels: list[str] | None = None
    fields: list[str] | None = None
    head: str = "auto"
    max_length: int | None = 256
    device: str = "auto"
    dtype: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    prompt: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.method = METHOD_ALIASES.get(self.method, self.method)
        if self.method not in CONFIGS:
            raise ConfigError(f"unknown method {self.method!r}; known: {sorted(CONFIGS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_length", "num_virtual_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.template is not None:
            from .template import parse_template

            parse_template(str(self.template))  # a syntax error is named before any data or model loads
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        known = {f.name for f in dataclasses.fields(CONFIGS[self.method])}
        for key in self.prompt:
            if key not in known:
                raise ConfigError(f"unknown key 'prompt.{key}' for {self.method}{_suggest(key, known, 'prompt.')}")
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {sorted(known)}"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans and floats: only true/false are booleans,
    and 1e-4 is a number. YAML 1.1
    (PyYAML's default) also reads yes/no/on/off as booleans, so ``mixed_precision: no`` in a
    run file, or ``--set train.mixed_precision=no``, would mean False instead of "no"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
# YAML 1.2 floats: PyYAML (1.1) wants a dot, so ``lr: 1e-4`` would be the string "1e-4".
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _coerce(raw: str) -> Any:
    """A --set value: YAML scalars (numbers, true/false, null, lists) or the raw string."""
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def apply(config: RunConfig, key: str, value: Any, *, source: str) -> None:
    """Set one dotted key on `config`, refusing unknown keys with a suggestion."""
    top = {f.name for f in dataclasses.fields(RunConfig)} - {"train", "prompt", "task_options"}
    section, _, rest = key.partition(".")
    if section == "train" and rest:
        names = TrainConfig.field_names()
        if rest not in names:
            raise ConfigError(f"{source}: unknown key 'train.{rest}'{_suggest(rest, names, 'train.')}")
        setattr(config.train, rest, value)
    elif section == "prompt" and rest:
        config.prompt[rest] = value
    elif section == "task" and rest:
        config.task_options[rest] = value
    elif key in top:
        setattr(config, key, value)
    else:
        everything = sorted(top) + [f"train.{n}" for n in TrainConfig.field_names()] + ["prompt.<field>", "task.<field>"]
        raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, everything)}")


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in data.items():
        if isinstance(v, dict) and k in ("train", "prompt", "task"):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def load_yaml(path: str | Path, config: RunConfig) -> None:
    """Apply a YAML run file (nested ``train:`` / ``prompt:`` / ``task:`` sections)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    lines = _key_lines(yaml.compose(path.read_text(encoding="utf-8"), Loader=_Loader))
    for key, value in _flatten(data):
        apply(config, key, value, source=f"{path}, line {lines[key]}" if key in lines else str(path))


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> the 1-based line where a run file sets it (for error messages)."""
    lines = {}
    for key_node, value_node in getattr(node, "value", []) if isinstance(node, yaml.MappingNode) else []:
        key = f"{prefix}{key_node.value}"
        lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode) and not prefix and key_node.value in ("train", "prompt", "task"):
            lines |= _key_lines(value_node, f"{key}.")
    return lines


def apply_sets(config: RunConfig, assignments: list[str]) -> None:
    """Apply ``--set key=value`` overrides."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        apply(config, key.strip(), _coerce(raw), source=f"--set {item}")
