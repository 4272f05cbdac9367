"""From a run configuration to a trained prompt, and from a trained prompt back to a
model and task: what `softprompt train / eval / predict` do, callable from Python.

    result = run_training(RunConfig(model="minilm", method="p-tuning-v2", task="sst2", output="runs/sst2"))
    model, task, info = load_trained("runs/sst2")
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architecture import ModelKind
from .errors import ConfigError, SoftPromptError
from .io import load_tensors, read_json_object, write_json_atomically
from .methods import config_class
from .model import SoftPromptModel
from .runconfig import RunConfig
from .tasks import Task, task_from_config
from .train import RunResult, TrainingError, evaluate, train

DEFAULT_DEEP_TOKENS = 20
DEFAULT_INPUT_TOKENS = 8
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoint", "prompt")


@dataclass
class Data:
    """The examples of a run and where they came from."""

    train: list[dict]
    dev: list[dict]
    test: list[dict] | None
    kind: str  # classification | ner | generation | lama
    labels: list[str] | None
    label_words: dict[str, list[str]] | None
    recipe: Any | None
    source: dict[str, Any]


def load_data(cfg: RunConfig) -> Data:
    """Examples for `cfg`: a recipe's splits, or the user's files (`--train/--eval`)."""
    from . import data as datamod

    generic = {"classification", "ner", "generation"}
    fields = _fields(cfg.fields)
    labels, words = _labels(cfg.labels)
    if cfg.task in generic:
        if not cfg.train_file or not cfg.eval_file:
            raise ConfigError(f"task {cfg.task!r} is generic: give --train FILE and --eval FILE (or a recipe name)")
        read = lambda p: datamod.read_examples(p, fields=fields, labels=labels if cfg.task == "classification" else None)
        train_ex, dev_ex = read(cfg.train_file), read(cfg.eval_file)
        test_ex = read(cfg.test_file) if cfg.test_file else None
        if cfg.task == "classification" and labels is None:
            labels = sorted({str(e["label"]) for e in train_ex})
        return Data(train_ex, dev_ex, test_ex, cfg.task, labels, words, None,
                    {"train": cfg.train_file, "eval": cfg.eval_file, "test": cfg.test_file})
    recipe = datamod.load_recipe(cfg.task, cfg.data_root)
    train_ex = datamod.read_examples(cfg.train_file, fields=fields) if cfg.train_file else recipe.examples("train")
    dev_ex = datamod.read_examples(cfg.eval_file, fields=fields) if cfg.eval_file else recipe.examples("dev")
    test_ex = datamod.read_examples(cfg.test_file, fields=fields) if cfg.test_file else recipe.examples("test")
    return Data(train_ex, dev_ex, test_ex, recipe.task, labels or recipe.labels, words or recipe.label_words,
                recipe, {"recipe": recipe.name, "notes": getattr(recipe, "notes", "")})


def _fields(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        column, sep, name = item.partition(":")
        if not sep or not column or not name:
            raise ConfigError(f"--field {item!r}: expected COLUMN:FIELD (e.g. sentence:text)")
        out[column] = name
    return out


def _labels(items: list[str] | None) -> tuple[list[str] | None, dict[str, list[str]] | None]:
    """``["pos", "neg"]`` or ``["pos:great", "neg:terrible|awful"]``."""
    if not items:
        return None, None
    labels, words = [], {}
    for item in items:
        label, sep, ws = item.partition(":")
        labels.append(label)
        if sep:
            words[label] = [w for w in ws.split("|") if w]
    if words and len(words) != len(labels):
        raise ConfigError(f"--labels {items}: give label words for every label or for none")
    return labels, words or None


def uses_verbalizer(cfg: RunConfig, data: Data, kind: ModelKind, has_lm_head: bool) -> bool:
    if cfg.head == "verbalizer":
        return True
    if cfg.head == "linear" or data.kind != "classification" or not has_lm_head or not data.label_words:
        return False
    return not config_class(cfg.method).deep  # P-tuning v1 / PET: input prompts read at [MASK]


def build_task(cfg: RunConfig, data: Data, verbalizer: bool) -> Task:
    from . import tasks

    options = dict(cfg.task_options)
    if data.kind == "classification":
        if verbalizer:
            if not data.label_words:
                raise ConfigError("a verbalizer needs label words: --labels LABEL:WORD ...")
            return tasks.TASKS["verbalizer"](data.label_words, **options)
        return tasks.TASKS["classification"](data.labels, **options)
    if data.kind == "ner":
        tags = sorted({t for e in data.train for t in e["tags"]} | {t for e in data.dev for t in e["tags"]})
        return tasks.TASKS["ner"](tags, **options)
    if data.kind == "generation":
        return tasks.TASKS["generation"](**options)
    if data.kind == "lama":
        return tasks.TASKS["lama"](**options)
    raise ConfigError(f"unknown task kind {data.kind!r}")


def default_template(cfg: RunConfig, data: Data, task: Task, model_kind: ModelKind, P: int, deep: bool) -> str:
    """The template when none is given: the recipe's for this model kind and head, with
    the virtual tokens in front for input methods that have no slots of their own."""
    recipe = data.recipe
    template = None
    if recipe is not None and hasattr(recipe, "template_for"):
        template = recipe.template_for(model_kind=model_kind.value, head=task.kind, deep=deep, method=cfg.method)
    if template is None:
        if data.kind == "ner":
            template = "{tokens}"
        elif data.kind == "generation":
            template = "{input}"
        else:
            fields = sorted({k for e in data.train[:50] for k in e if k not in ("label", "idx", "target", "tags")})
            template = " ".join(f"{{{f}}}" for f in fields) if fields else "{text}"
            if task.kind == "verbalizer":
                template += " [MASK]"
    if not deep and "[P" not in template:
        template = f"[P:{P}] " + template
    return template


def _check_output(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse an output that cannot take this run, touching nothing."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output {out} exists and is not a directory")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if resume:
        if not (out / "checkpoint").is_dir():
            raise TrainingError(f"--resume: {out} holds no checkpoint to continue from")
    elif holds_run and not overwrite:
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    return out


def _check_examples(model: SoftPromptModel, task: Task, data: Data) -> None:
    """Every example has the template's fields, and the first of each split encodes (a
    fixed part longer than max_length, say): refused before the run directory is touched,
    naming the file and the example."""
    for split, examples in (("train", data.train), ("eval", data.dev), ("test", data.test)):
        if not examples:
            continue
        source = data.source.get(split) or f"the {data.source.get('recipe', 'recipe')} {split} split"
        for i, example in enumerate(examples):
            missing = [name for name in model.template.fields if name not in example]
            if missing:
                raise ConfigError(f"{source}: example {i + 1} has no field {missing[0]!r} used by the template "
                                  f"{model.template.source!r}; its fields are {sorted(example)} (map a column to a "
                                  f"field with --field COLUMN:{missing[0]})")
        # A throwaway copy of the task, under a forked RNG: binding creates a head with random
        # weights, which must still come from the run's seed inside `train`.
        with torch.random.fork_rng(devices=[]):
            probe = copy.deepcopy(task)
            probe.bind(model)
            try:
                probe.collate(model, examples[:1])
            except SoftPromptError as e:
                raise type(e)(f"{source}: {e}") from None


def _prepare_output(out: Path, resume: bool) -> None:
    """Clear a replaced run and create the directory: called only once everything the run
    needs (data, model, template, task) has loaded, so a refused run loses nothing."""
    if not resume:
        for marker in RUN_MARKERS + ("metrics.json", "curves.png", "tensorboard"):
            target = out / marker
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train as `softprompt train` does; returns the result (metrics also in the run dir)."""
    from .base_models import load_base, resolve_device, training_dtype

    if resume:
        recorded = Path(cfg.output) / "config.json"
        if not recorded.is_file():
            raise TrainingError(f"--resume: {recorded} is missing")
        cfg = _from_dict(read_json_object(recorded))
    cfg.validate()
    out = _check_output(cfg, resume, overwrite)
    data = load_data(cfg)
    if not data.train:
        raise TrainingError("the training split is empty")
    device = resolve_device(cfg.device)
    base, tokenizer = load_base(cfg.model, head="auto", dtype=training_dtype(cfg.dtype, device))
    base.to(device)
    kind = _kind(base)
    has_lm_head = base.get_output_embeddings() is not None
    verbalizer = uses_verbalizer(cfg, data, kind, has_lm_head)
    task = build_task(cfg, data, verbalizer)
    method_cls = config_class(cfg.method)
    P = cfg.num_virtual_tokens or (DEFAULT_DEEP_TOKENS if method_cls.deep else DEFAULT_INPUT_TOKENS)
    template = cfg.template or default_template(cfg, data, task, kind, P, method_cls.deep)
    n = cfg.num_virtual_tokens if not method_cls.deep else P
    prompt_config = method_cls(num_virtual_tokens=n, template=template, **cfg.prompt)
    model = SoftPromptModel(base, prompt_config, tokenizer=tokenizer)
    model.max_length = cfg.max_length
    _check_examples(model, task, data)
    resolved = cfg.to_dict() | {"template": template, "num_virtual_tokens": model.num_virtual_tokens,
                                "resolved_task": task.kind, "data": data.source}
    _prepare_output(out, resume)
    if not resume:
        write_json_atomically(out / "config.json", resolved)
    metadata = {"task": task.kind, "model": cfg.model, "data": data.source, "max_length": cfg.max_length,
                "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("progress", "tensorboard")}}
    result = train(model, task, data.train, data.dev, cfg.train, out, resume=resume, metadata=metadata)
    if data.test and data.test != data.dev and (out / "prompt" / "task.json").exists():
        # Model selection on dev, the reported number on test: the best prompt, not the last.
        scores, _ = evaluate_saved(out / "prompt", model.base, tokenizer, data.test, cfg.train.eval_batch_size)
        result.metrics["test"] = scores
        write_json_atomically(out / "metrics.json", result.metrics)
    return result


def evaluate_saved(directory: Path, base, tokenizer, examples: list[dict], batch_size: int = 64):
    """Metrics and predictions of a saved prompt + head on `examples`, on an already loaded base."""
    return evaluate(*load_saved(directory, base, tokenizer), examples, batch_size)


def _kind(base) -> ModelKind:
    from .architecture import model_kind

    return model_kind(base)


def _from_dict(saved: dict[str, Any]) -> RunConfig:
    from .train import TrainConfig

    keep = {k: v for k, v in saved.items() if k in RunConfig.__dataclass_fields__}
    keep["train"] = TrainConfig(**keep.get("train", {}))
    return RunConfig(**keep)


def prompt_directory(path: str | Path) -> Path:
    """A run directory or a prompt folder -> the prompt folder."""
    path = Path(path)
    if (path / "prompt" / "prompt_config.json").exists():
        return path / "prompt"
    return path


def load_trained(path: str | Path, *, model: str | None = None):
    """Load a trained prompt with its task head.

    Args:
        path: a run directory or its ``prompt/`` folder.
        model: the base model (alias / path); default: the one it was trained on.

    Returns:
        (SoftPromptModel, Task, metadata dict).
    """
    directory, saved, base, tokenizer = load_recorded_base(path, model=model)
    sp_model, task = load_saved(directory, base, tokenizer)
    sp_model.max_length = saved["metadata"].get("max_length")  # rows as long as in training
    return sp_model, task, saved["metadata"]


def load_recorded_base(path: str | Path, *, model: str | None = None, device: str = "auto"):
    """The base model a saved prompt was trained on (or `model`), loaded on `device`
    (auto: the GPU when there is one).

    Returns:
        (prompt folder, its prompt_config.json content, base model, tokenizer).
    """
    from .io import read_config
    from .base_models import load_base, resolve_device

    directory = prompt_directory(path)
    saved = read_config(directory)
    name = model or saved["metadata"].get("model") or saved["base_model"].get("name_or_path")
    if not name:
        raise ConfigError(f"{directory}: the base model is not recorded; pass --model")
    base, tokenizer = load_base(name)
    base.to(resolve_device(device))
    return directory, saved, base, tokenizer


def load_saved(directory: Path, base, tokenizer) -> tuple[SoftPromptModel, Task]:
    """A saved prompt folder and its task head on an already loaded base model (eval mode)."""
    sp_model = SoftPromptModel.from_pretrained(base, directory, tokenizer=tokenizer).eval()
    task_file = directory / "task.json"
    if not task_file.exists():
        raise ConfigError(f"{task_file}: missing; this prompt was saved without a task")
    task = task_from_config(read_json_object(task_file))
    task.bind(sp_model)
    if (directory / "head.safetensors").exists():
        task.load_state_dict(load_tensors(directory / "head.safetensors"))
    task.eval()
    return sp_model, task


def evaluate_trained(path, *, split: str = "test", task_name: str | None = None, data_root: str | None = None,
                     data_file: str | None = None, model: str | None = None, batch_size: int = 64,
                     fields: list[str] | None = None) -> dict[str, Any]:
    """Metrics of a trained prompt on a split of its recipe, or on a data file (`fields`:
    ``COLUMN:FIELD`` renamings of its columns, as for training)."""
    from . import data as datamod

    sp_model, task, meta = load_trained(path, model=model)
    if data_file:
        examples = datamod.read_examples(data_file, fields=_fields(fields))
    else:
        recipe_name = task_name or (meta.get("data") or {}).get("recipe")
        if not recipe_name:
            raise ConfigError("this prompt was trained on files, not a recipe: give --data FILE or --task RECIPE")
        examples = datamod.load_recipe(recipe_name, data_root).examples(split)
    scores, _ = evaluate(sp_model, task, examples, batch_size)
    return {"split": split if not data_file else data_file, **scores}


def evaluate_zero_shot(model: str, task_name: str, *, split: str = "test", template: str | None = None,
                       data_root: str | None = None, data_file: str | None = None, labels: list[str] | None = None,
                       fields: list[str] | None = None, task_options: dict[str, Any] | None = None,
                       batch_size: int = 64, base_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Metrics of the frozen base model with a manual prompt and no trained vectors.

    The baseline every soft prompt is measured against (LAMA's manual templates, PET's
    patterns): the template's text is real tokens, the answer is read at ``[MASK]`` by a
    verbalizer (classification recipes with label words) or the LAMA probe.

    Args:
        model: alias, path or hub id of the base model (needs an LM head).
        task_name: a recipe (``fewglue-rte``, ``lama-trex:P19``, ...) or ``classification``
            with `data_file` and `labels` given as ``LABEL:WORD``.
        split: the recipe split to evaluate.
        template: the manual template (default: the recipe's for this model kind); it has
            a ``[MASK]`` and no ``[P:n]`` slots.
        fields: ``COLUMN:FIELD`` renamings of `data_file`'s columns.
        task_options: extra keyword arguments of the task (e.g. LAMA ``candidates``).
        base_and_tokenizer: an already loaded ``(base, tokenizer)`` to reuse.

    Returns:
        ``{"split": ..., "template": ..., **metrics}``.

    Raises:
        ConfigError: a task without an answer slot (a linear head must be trained), a
            template with virtual slots, or a recipe without label words.
    """
    from . import data as datamod
    from .methods import PTuningV2Config
    from .base_models import load_base, resolve_device

    cfg = RunConfig(model=model, task=task_name, data_root=data_root, labels=labels, fields=fields,
                    train_file=data_file, eval_file=data_file, test_file=data_file)
    if task_name in ("ner", "generation"):
        raise ConfigError(f"zero-shot evaluation reads an answer slot; task {task_name!r} has none")
    data = load_data(cfg)
    if data.kind == "classification" and not data.label_words:
        raise ConfigError("zero-shot classification needs label words: --labels LABEL:WORD ... (or a recipe with them)")
    if data.kind not in ("classification", "lama"):
        raise ConfigError(f"zero-shot evaluation reads an answer slot (verbalizer or LAMA); {data.kind!r} has none: "
                          "train a prompt and a head instead")
    base, tokenizer = base_and_tokenizer or load_base(model)
    if base_and_tokenizer is None:
        base.to(resolve_device("auto"))
    kind = _kind(base)
    task = build_task(RunConfig(task_options=dict(task_options or {})), data, verbalizer=True)
    if template is None:
        template = (data.recipe.template_for(model_kind=kind.value, head=task.kind, deep=True) if data.recipe
                    else None)
        if template is None or "[MASK]" not in template:
            raise ConfigError("give --template with a [MASK] answer slot (this task has no manual template)")
    if "[P" in template:
        raise ConfigError(f"a zero-shot template has no virtual tokens: {template!r}")
    # The vessel is a one-position deep prompt, switched off: `disable_prompt` runs the
    # bare base model on the template's real tokens.
    sp_model = SoftPromptModel(base, PTuningV2Config(num_virtual_tokens=1, template=template), tokenizer=tokenizer)
    examples = datamod.read_examples(data_file, fields=_fields(fields)) if data_file else (
        {"train": data.train, "dev": data.dev, "test": data.test}[split] if split in ("train", "dev", "test") else None)
    if examples is None:
        raise ConfigError(f"split must be train, dev or test, got {split!r}")
    task.bind(sp_model)
    with sp_model.disable_prompt():
        scores, _ = evaluate(sp_model, task, examples, batch_size)
    return {"split": split if not data_file else data_file, "template": template, **scores}


def read_inputs(model: SoftPromptModel, texts: list[str], input_file: Path | None) -> list[dict]:
    """Examples for `predict`: plain texts fill the template's only field; a jsonl file
    gives whole examples."""
    from . import data as datamod

    examples: list[dict] = []
    if texts:
        fields = model.template.fields
        if len(fields) != 1:
            raise ConfigError(f"the template {model.template.source!r} has fields {list(fields)}: use --input FILE.jsonl")
        examples += [{fields[0]: t.split() if fields[0] == "tokens" else t} for t in texts]
    if input_file is not None:
        examples += datamod.read_examples(input_file)
    if not examples:
        raise ConfigError("nothing to predict: give texts or --input FILE.jsonl")
    return examples
