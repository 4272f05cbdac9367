"""A run's configuration: dataclasses in code (`TrainConfig`: the loop's settings;
`RunConfig`: the whole run), YAML on disk, ``--set key=value`` at the CLI.

Keys are dotted paths: top-level run settings (``model``, ``method``, ``template``, ...),
``train.<field>`` (`TrainConfig`), ``prompt.<field>`` (the method config's own fields,
e.g. ``prompt.encoder=mlp``) and ``task.<field>`` (e.g. ``task.pool=mean``). An unknown
key is refused with the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..base_models import DTYPES
from ..errors import ConfigError
from ..loss import LM_LOSSES
from ..methods import CONFIGS
from ..template import parse_template

SCHEDULES = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: experiment trackers of ``train.report_to`` (the name of its pip extra, comet aside; `logs.py` runs them)
REPORT_TO = ("tensorboard", "wandb", "mlflow", "comet")


@dataclass
class TrainConfig:
    """Settings of one training run.

    Attributes:
        steps: optimiser steps (an upper bound when early stopping is on).
        batch_size: examples per micro-batch, over all processes.
        grad_accum: micro-batches per optimiser step.
        lr: learning rate of the prompt; head_lr: of the task head.
        delta_lr: learning rate of DePT's low-rank pair (A, B) of its input delta, the
            paper's second rate (the prompt's is ``lr``); other methods have no such pair.
            1e-4: the best of 1e-4, 1e-3 and 1e-2 on the rows held out of SST-2's train
            (MiniLM, prompt LR 0.03, seed 0: 85.30, 85.00 and 83.40%; GLUE dev 82.68, 81.54
            and 78.44%, docs/RESULTS.md), and the paper's rate for its low-rank pair.
        weight_decay: AdamW weight decay (prompt and head).
        warmup_ratio: share of `steps` with a linear warm-up.
        schedule: decay after warm-up: linear, cosine or constant.
        max_grad_norm: gradient clipping (0: off).
        seed: data order, dropout and initialisation; a CPU run is bit-reproducible.
        eval_every: evaluate (and checkpoint) every N steps; 0: only at the end.
        eval_batch_size: examples per evaluation batch.
        patience: stop after this many evaluations without improvement (None: never).
        bucket: group examples of similar length into batches (less padding).
        mixed_precision: auto (bf16 autocast for an fp32 base on a GPU; a base loaded in
            bf16 / fp16, or on the CPU, runs as it is), no, bf16.
        compile: `torch.compile` the base's repeated blocks for training forwards (regional
            compilation): auto (the default: compiled for a causal LM on one CUDA device, eager on a CPU
            and under several processes; `fast_path.resolved_compile`), false, true
            (`torch.compile`'s default mode) or a mode name, ``reduce-overhead`` (each
            block's forward and backward replayed as CUDA graphs: fewer launches, for small
            models whose steps the host bounds) or ``max-autotune``.
        lm_loss: the kernel of a causal LM's token loss (generation tasks): auto (the
            default: liger-kernel's fused LM head and cross-entropy on a CUDA device where
            the ``liger`` extra is installed, else softprompt's chunks;
            `fast_path.resolved_lm_loss`), chunks (the LM head a chunk of positions at a
            time, any device) or liger. Both compute the same loss and never hold the
            whole (B, S, V) scores.
        gradient_checkpointing: recompute each block's activations in the backward pass
            (less memory, about one more forward of time); works for deep prompts too.
        float8: run the frozen base's linear layers in FP8 while training (opt-in; for
            Hopper GPUs; `float8.py`: the weights cast once to E4M3 with one scale per row,
            the forward and backward products through ``torch._scaled_mm``; the LM head,
            embeddings and the prompt's own layers stay as they are). Costs precision in
            every product: check the dev accuracy against a bf16 run.
        packing: run each micro-batch padding-free: its rows packed end to end into
            sequences of at most `pack_tokens` tokens, each row attending only to itself
            (and to a deep prompt's prefix), at its own positions (`packing.py`). Same
            examples per step, same loss and gradients as the padded batch. Causal LMs and
            encoders with SDPA, eager or flex attention; other models train padded (one log line).
        pack_tokens: most tokens of one packed sequence (virtual slots included; a deep
            prefix is not counted: it is stored once per sequence); a longer row gets a
            sequence of its own. Under SDPA and eager attention a packed sequence of W
            tokens computes every query against all W keys (masked, not skipped): about
            W / (6 x hidden size) more work a token than rows alone (GPT-2 at 512: ~11%;
            flex attention skips the blocks no segment reads).
        report_to: experiment trackers that also receive the metrics (accelerate's): none,
            or one or more of tensorboard, wandb, mlflow, comet, as a list or comma-separated
            (``tensorboard,wandb``). Each needs its extra (``pip install 'softprompt[wandb]'``;
            comet: ``pip install comet-ml``).
        project: the trackers' project (W&B project, MLflow experiment, Comet project,
            TensorBoard folder); the run is named after its output folder.
        progress: show a progress bar.
    """

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-2
    head_lr: float = 5e-3
    delta_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batch_size: int = 64
    patience: int | None = None
    bucket: bool = True
    mixed_precision: str = "auto"
    compile: bool | str = "auto"
    lm_loss: str = "auto"
    gradient_checkpointing: bool = False
    float8: bool = False
    packing: bool = False
    pack_tokens: int = 512
    # "none" by default, as before this key (no tracker ran unless asked) and as transformers 5's
    # TrainingArguments: a tracker that was not asked for would write outside the run folder
    # (W&B, MLflow) or ask for an account.
    report_to: str | list[str] = "none"
    project: str = "softprompt"
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "pack_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be a non-negative integer, got {self.eval_every!r}")
        for name in ("lr", "head_lr", "delta_lr"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not isinstance(self.warmup_ratio, (int, float)) or isinstance(self.warmup_ratio, bool) \
                or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be a number in [0, 1), got {self.warmup_ratio!r}")
        if self.compile not in (True, False, "auto") + COMPILE_MODES:
            raise ConfigError(f"train.compile must be auto, true, false or one of {COMPILE_MODES}, got {self.compile!r}")
        if self.lm_loss not in ("auto",) + LM_LOSSES:
            raise ConfigError(f"train.lm_loss must be auto, {' or '.join(LM_LOSSES)}, got {self.lm_loss!r}")
        for name in ("bucket", "gradient_checkpointing", "float8", "packing", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise ConfigError(f"train.patience must be a positive integer or null, got {self.patience!r}")
        self.report_to = ",".join(_trackers(self.report_to)) or "none"  # one spelling in config files
        if not isinstance(self.project, str) or not self.project.strip():
            raise ConfigError(f"train.project must be a non-empty name, got {self.project!r}")

    @property
    def trackers(self) -> list[str]:
        """The trackers of `report_to`, in its order ([] for none)."""
        return _trackers(self.report_to)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _trackers(value: Any) -> list[str]:
    """`TrainConfig.report_to` as tracker names: a list, or one comma-separated string."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"train.report_to must be none or tracker names ({', '.join(REPORT_TO)}), got {value!r}")
    names = [i.strip().lower() for i in items if i.strip()]
    for name in names:
        if name not in REPORT_TO + ("none",):
            raise ConfigError(f"train.report_to: unknown tracker {name!r}{suggest(name, REPORT_TO + ('none',))}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"train.report_to: 'none' cannot be combined with trackers, got {value!r}")
    return list(dict.fromkeys(n for n in names if n != "none"))


def _legacy_tensorboard(train: TrainConfig, on: Any) -> None:
    """``train.tensorboard: true|false``, the switch `report_to` replaced: run files and run
    folders (``--resume``) written before it still load, as the tracker turned on or off."""
    if not isinstance(on, bool):
        raise ConfigError(f"train.tensorboard (now train.report_to=tensorboard) must be true or false, got {on!r}")
    names = [n for n in _trackers(train.report_to) if n != "tensorboard"] + (["tensorboard"] if on else [])
    train.report_to = ",".join(names) or "none"


METHOD_ALIASES = {"prompt_tuning": "prompt-tuning", "p_tuning": "p-tuning", "prefix_tuning": "prefix-tuning",
                  "p_tuning_v2": "p-tuning-v2", "ptuning": "p-tuning", "ptuning-v2": "p-tuning-v2"}
HEADS = ("auto", "verbalizer", "linear")


@dataclass
class RunConfig:
    """Everything `softprompt train` needs.

    Attributes:
        model: alias (``minilm``, ``smollm2-135m``, ``bert-tiny-mlm``), local path or hub id.
        method: prompt-tuning | p-tuning | prefix-tuning | p-tuning-v2 | dept.
        task: a recipe name (``sst2``, ``rte``, ``fewglue-cb``, ``wnut17``, ``lama-trex``, ...)
            or a generic kind: classification | ner | generation.
        output: the run directory.
        train_file / eval_file / test_file: data files (override the recipe's).
        dev_holdout: rows of the training split held out (seeded by ``train.seed``, at most
            a tenth of it) to select the best prompt on, where there is no dev split apart
            from the reported one: a recipe whose only labelled evaluation split is its
            official dev (SST-2, RTE: that split is then the reported test, never selected
            on), or ``--train`` and ``--test`` files without ``--eval``.
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
        tensor_parallel: split the frozen base over the processes of a torchrun launch
            (transformers' ``tp_plan="auto"``: each holds 1/N of every split weight, for a
            base larger than one device); processes that split one base take the same
            batches, and deep prompts reach each as its own K/V heads.
        prompt / task_options: extra fields of the method config / the task.
    """

    model: str = "minilm"
    method: str = "p-tuning-v2"
    task: str = "sst2"
    output: str = "runs/run"
    train_file: str | None = None
    eval_file: str | None = None
    test_file: str | None = None
    dev_holdout: int = 1000
    data_root: str | None = None
    template: str | None = None
    num_virtual_tokens: int | None = None
    labels: list[str] | None = None
    fields: list[str] | None = None
    head: str = "auto"
    max_length: int | None = 256
    device: str = "auto"
    dtype: str = "auto"
    tensor_parallel: bool = False
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
        for name in ("max_length", "num_virtual_tokens", "dev_holdout"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.template is not None:
            parse_template(str(self.template))  # a syntax error is named before any data or model loads
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.tensor_parallel, bool):
            raise ConfigError(f"tensor_parallel must be true or false, got {self.tensor_parallel!r}")
        known = {f.name for f in dataclasses.fields(CONFIGS[self.method])}
        for key in self.prompt:
            if key not in known:
                raise ConfigError(f"unknown key 'prompt.{key}' for {self.method}{suggest(key, known, 'prompt.')}")
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "RunConfig":
        """The configuration a run directory's ``config.json`` records (its extra keys ignored)."""
        keep = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        train = dict(keep.get("train", {}))
        legacy = train.pop("tensorboard", None)
        keep["train"] = TrainConfig(**train)
        if legacy is not None:
            _legacy_tensorboard(keep["train"], legacy)
        return cls(**keep)


def suggest(key: str, known, prefix: str = "") -> str:
    """'; did you mean ...?' with the closest known key, else the known keys."""
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
    if section == "train" and rest == "tensorboard":
        _legacy_tensorboard(config.train, value)
    elif section == "train" and rest:
        names = TrainConfig.field_names()
        if rest not in names:
            raise ConfigError(f"{source}: unknown key 'train.{rest}'{suggest(rest, names, 'train.')}")
        setattr(config.train, rest, value)
    elif section == "prompt" and rest:
        config.prompt[rest] = value
    elif section == "task" and rest:
        config.task_options[rest] = value
    elif key in top:
        setattr(config, key, value)
    else:
        everything = sorted(top) + [f"train.{n}" for n in TrainConfig.field_names()] + ["prompt.<field>", "task.<field>"]
        raise ConfigError(f"{source}: unknown key {key!r}{suggest(key, everything)}")


#: keys a run folder's config.json records about the run, not settings: a replay ignores them
RECORDED = ("resolved_task", "data")


def _flatten(data: dict[str, Any], prefix: str = "", recorded: bool = False) -> list[tuple[str, Any]]:
    items = []
    for k, v in data.items():
        if isinstance(v, dict) and k in ("train", "prompt", "task", "task_options"):
            items += _flatten(v, f"{prefix}{'task' if k == 'task_options' else k}.")  # task_options: config.json's name
        elif recorded or not (prefix == "" and k in RECORDED):
            items.append((f"{prefix}{k}", v))
    return items


def dotted(config: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration (`RunConfig.to_dict`, or config.json with its `RECORDED` keys)
    keyed as ``--set`` keys it: ``model``, ``train.lr``, ``prompt.encoder``, ``task.pool``."""
    return dict(_flatten(config, recorded=True))


def to_yaml(config: RunConfig) -> str:
    """The whole configuration as a YAML run file (`load_yaml` reads it back as it is)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def load_yaml(path: str | Path, config: RunConfig) -> list[str]:
    """Apply a YAML run file (nested ``train:`` / ``prompt:`` / ``task:`` sections; a run
    folder's config.json, or `to_yaml`'s output, as it is). Returns the keys it set."""
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
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    lines = _key_lines(yaml.compose(path.read_text(encoding="utf-8"), Loader=_Loader))
    keys = []
    for key, value in _flatten(data):
        apply(config, key, value, source=f"{path}, line {lines[key]}" if key in lines else str(path))
        keys.append(key)
    return keys


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
