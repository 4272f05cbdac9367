"""A run configuration assembled into what the loop takes: the examples (`load_data`), the
task (`build_task`), the template (`default_template`) and the prompt's configuration
(`prompt_config`), each checked before anything is written: every row of every split
(`check_targets`, `check_examples`, `check_rows`), each bad one named by file, line and field.
"""

from __future__ import annotations

import copy
import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch

from .. import data as datamod
from .. import tasks
from ..architecture import ModelKind
from ..errors import ConfigError, SoftPromptError
from ..methods import PromptConfig, config_class
from ..model import SoftPromptModel
from ..tasks import Task
from ..tasks.generation import Generation
from ..tasks.labels import LabelTask
from ..tasks.token_classification import TokenClassification
from .config import RunConfig, suggest

DEFAULT_DEEP_TOKENS = 20
DEFAULT_INPUT_TOKENS = 8


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
    labels_from: str = "the training split"  # where `labels` come from, for the errors naming them
    selected_on: str = "dev"  # which split chose the best prompt, and which is reported (`metrics.json`)
    reported_on: str | None = None

    def splits(self) -> list[tuple[str, list[dict]]]:
        """``(name, examples)`` of the splits there are: train, eval, test."""
        return [(name, ex) for name, ex in (("train", self.train), ("eval", self.dev), ("test", self.test)) if ex]

    def describe(self, split: str) -> str:
        """Where a split came from, for errors about examples read from no file (LAMA)."""
        return self.source.get(split) or f"the {self.source.get('recipe', 'recipe')} {split} split"


def load_data(cfg: RunConfig) -> Data:
    """Examples for `cfg`: a recipe's splits, or the user's files (`--train/--eval`)."""
    generic = {"classification", "ner", "generation"}
    fields = parse_fields(cfg.fields)
    labels, words = _labels(cfg.labels)
    if cfg.task in generic:
        if not cfg.train_file or not (cfg.eval_file or cfg.test_file):
            raise ConfigError(f"task {cfg.task!r} is generic: give --train FILE and --eval FILE and/or --test FILE "
                              "(or a recipe name)")
        read = lambda p: datamod.read_examples(p, fields=fields)
        train_ex = read(cfg.train_file)
        dev_ex = read(cfg.eval_file) if cfg.eval_file else None
        test_ex = read(cfg.test_file) if cfg.test_file else None
        data = Data(train_ex, dev_ex, test_ex, cfg.task, labels, words, None,
                    {"train": cfg.train_file, "eval": cfg.eval_file, "test": cfg.test_file})
    else:
        recipe = datamod.load_recipe(cfg.task, cfg.data_root)
        train_ex = datamod.read_examples(cfg.train_file, fields=fields) if cfg.train_file else recipe.examples("train")
        dev_ex = datamod.read_examples(cfg.eval_file, fields=fields) if cfg.eval_file else recipe.examples("dev")
        test_ex = datamod.read_examples(cfg.test_file, fields=fields) if cfg.test_file else recipe.examples("test")
        # SST-2's and RTE's only labelled evaluation split is their official dev, which is
        # reported: the best prompt is then selected on rows held out of train (`hold_out_dev`)
        same = (not cfg.eval_file and not cfg.test_file and recipe.files.get("test") is not None
                and recipe.files.get("test") == recipe.files.get("dev"))
        data = Data(train_ex, None if same else dev_ex, test_ex, recipe.task, labels or recipe.labels,
                    words or recipe.label_words, recipe, {"recipe": recipe.name, "notes": getattr(recipe, "notes", "")},
                    f"recipe {recipe.name!r}")
        if not cfg.test_file and recipe.files.get("test"):
            data.source["test"] = f"the {recipe.name} recipe's {recipe.files['test']}"
    if labels:
        data.labels_from = "--labels"
    hold_out_dev(data, cfg)
    check_targets(data)
    return data


def hold_out_dev(data: Data, cfg: RunConfig) -> None:
    """The held-out protocol: with no dev split apart from the reported one, the best prompt
    is selected on `cfg.dev_holdout` rows of the training split (seeded by the run's seed,
    at most a tenth of it, taken out of training) and the test split is reported, never
    selected on; `data.selected_on` / `reported_on` say which is which.

    Raises:
        ConfigError: a training split too small to hold rows out (give --eval FILE).
    """
    data.reported_on = "test" if data.test else None
    if data.dev is not None:
        data.selected_on = "dev"
        return
    n = min(cfg.dev_holdout, len(data.train) // 10)
    if n < 1:
        raise ConfigError(f"{len(data.train)} training rows are too few to hold out a dev split (a tenth of them): "
                          "give --eval FILE to select the best prompt on")
    held = set(random.Random(cfg.train.seed).sample(range(len(data.train)), n))
    data.dev = [e for i, e in enumerate(data.train) if i in held]
    data.train = [e for i, e in enumerate(data.train) if i not in held]
    data.selected_on = f"dev: {n} rows held out of the training split (seed {cfg.train.seed})"
    data.source["eval"] = f"{n} rows held out of {data.describe('train')}"


def check_targets(data: Data) -> None:
    """Every row of every split carries a label (NER: a tag per word) the run knows: one of
    the declared labels (``--labels``, the recipe's), else one seen in the training split,
    which then become `data.labels`. A dev label never seen in training could never be
    predicted, and would only be scored as wrong.

    Raises:
        DataError: the file, line, field and label, and the known labels.
    """
    if data.kind not in ("classification", "ner"):
        return
    check, noun = (datamod.check_labels, "labels") if data.kind == "classification" else (datamod.check_tags, "tags")
    if data.labels is None:
        data.labels = check(data.train, source=data.describe("train"))
    for split, examples in data.splits():
        check(examples, data.labels, f"the known {noun} (from {data.labels_from})", source=data.describe(split))


def parse_fields(items: list[str] | None) -> dict[str, str] | None:
    """``["sentence:text"]`` (``--field COLUMN:FIELD``) -> ``{"sentence": "text"}``."""
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


#: the task classes a data kind may train (classification: a verbalizer or a linear head)
_KIND_TASKS = {"classification": ("verbalizer", "classification"), "ner": ("ner",), "generation": ("generation",),
               "lama": ("lama",)}


def check_task_options(cfg: RunConfig, data: Data) -> None:
    """Refuse a ``task.*`` key that no task of the data's kind takes, with the closest one
    (before the model loads: a misspelt option is not found after minutes of loading)."""
    known: set[str] = set()
    for name in _KIND_TASKS.get(data.kind, ()):
        parameters = list(inspect.signature(tasks.TASKS[name].__init__).parameters.values())[1:]
        known |= {p.name for p in parameters if p.default is not inspect.Parameter.empty}
    for key in cfg.task_options:
        if key not in known:
            raise ConfigError(f"unknown key 'task.{key}' for a {data.kind} task{suggest(key, known, 'task.')}")


def build_task(cfg: RunConfig, data: Data, verbalizer: bool) -> Task:
    check_task_options(cfg, data)
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


def prompt_config(cfg: RunConfig, data: Data, task: Task, kind: ModelKind) -> PromptConfig:
    """The method's configuration: the virtual tokens (default 20 per layer for deep methods,
    8 for input ones) and the template (default: `default_template`)."""
    method_cls = config_class(cfg.method)
    P = cfg.num_virtual_tokens or (DEFAULT_DEEP_TOKENS if method_cls.deep else DEFAULT_INPUT_TOKENS)
    template = cfg.template or default_template(cfg, data, task, kind, P, method_cls.deep)
    n = cfg.num_virtual_tokens if not method_cls.deep else P
    return method_cls(num_virtual_tokens=n, template=template, **cfg.prompt)


def check_examples(model: SoftPromptModel, task: Task, data: Data) -> None:
    """Every example of every split fills the template's fields (and a generation target),
    and the first of each encodes (a fixed part longer than max_length, say): refused before
    the run directory is touched, naming the file, line and field. (Labels: `check_targets`.)"""
    for split, examples in data.splits():
        source = data.describe(split)
        check_rows(model, task, examples, source, labels=False)
        # A throwaway copy of the task, under a forked RNG: binding creates a head with random
        # weights, which must still come from the run's seed inside `train`.
        with torch.random.fork_rng(devices=[]):
            probe = copy.deepcopy(task)
            probe.bind(model)
            try:
                probe.collate(model, examples[:1])
            except SoftPromptError as e:  # the first row's file and line, keeping the error's kind
                raise type(e)(str(datamod.row_error(examples, 0, str(e), source))) from None


def check_rows(model: SoftPromptModel, task: Task, examples: list[dict], source: str | None = None, *,
               labels: bool = True, targets: bool = True) -> None:
    """Every row of `examples` fills the template's fields (each a non-empty, valid string;
    the words of a tagging task a list of them) and, with `targets`, carries what the task
    scores: a generation target; with `labels`, a label (NER: tags) the task knows.

    Raises:
        DataError: the file and line of the row (`source` and its number for examples read
            from no file), the field, and what is wrong with it.
    """
    datamod.check_fields(examples, model.template.fields, task.word_field, source, template=model.template.source)
    if not targets:
        return
    if isinstance(task, Generation):
        datamod.check_fields(examples, [task.target_field], source=source)
    if labels and isinstance(task, LabelTask):
        datamod.check_labels(examples, task.labels, "the labels the prompt was trained for", source)
    elif labels and isinstance(task, TokenClassification):
        datamod.check_tags(examples, task.tags, "the tags the prompt was trained for", task.field, task.tags_field,
                           source)


__all__ = ["Data", "load_data", "check_targets", "parse_fields", "uses_verbalizer", "build_task", "default_template",
           "prompt_config", "check_examples", "check_rows"]
