"""Scores: a task's metrics on examples (`evaluate`), of a saved prompt (`evaluate_saved`,
`evaluate_trained`), of the frozen base with a manual prompt and no trained vectors
(`evaluate_zero_shot`), and the inputs of `softprompt predict` (`read_inputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .. import data as datamod
from ..architecture import model_kind
from ..base_models import load_base, resolve_device
from ..errors import ConfigError, TrainingError
from ..folder import load_trained, load_with_task
from ..methods import PTuningV2Config
from ..model import SoftPromptModel
from ..tasks import Task
from .assemble import build_task, check_rows, load_data, parse_fields
from .config import RunConfig
from .order import example_length


@torch.no_grad()
def evaluate(model, task: Task, examples: Sequence[dict], batch_size: int = 64) -> tuple[dict[str, float], list[Any]]:
    """Metrics and per-example predictions (in the input order) of `task` on `examples`."""
    if not examples:
        raise TrainingError("nothing to evaluate: the evaluation split is empty")
    was_training = model.training
    model.eval()
    task.eval()
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    predictions: list[Any] = [None] * len(examples)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch, _ = task.collate(model, [examples[i] for i in idx], with_targets=False)
            for i, p in zip(idx, task.predict(model, batch)):
                predictions[i] = p
    finally:
        model.train(was_training)
        task.train(was_training)
    references = [task.reference(e) for e in examples]
    return task.metrics(predictions, references), predictions


def evaluate_saved(directory: Path, base, tokenizer, examples: list[dict], batch_size: int = 64):
    """Metrics and predictions of a saved prompt + head on `examples`, on an already loaded base."""
    return evaluate(*load_with_task(directory, base, tokenizer), examples, batch_size)


def evaluate_trained(path, *, split: str = "test", task_name: str | None = None, data_root: str | None = None,
                     data_file: str | None = None, model: str | None = None, batch_size: int = 64,
                     fields: list[str] | None = None) -> dict[str, Any]:
    """Metrics of a trained prompt on a split of its recipe, or on a data file (`fields`:
    ``COLUMN:FIELD`` renamings of its columns, as for training)."""
    sp_model, task, meta = load_trained(path, model=model)
    if data_file:
        examples = datamod.read_examples(data_file, fields=parse_fields(fields))
    else:
        recipe_name = task_name or (meta.get("data") or {}).get("recipe")
        if not recipe_name:
            raise ConfigError("this prompt was trained on files, not a recipe: give --data FILE or --task RECIPE")
        recipe = datamod.load_recipe(recipe_name, data_root)
        examples = recipe.examples(split, file_labels=recipe.uses_file_labels(getattr(task, "labels", None)))
    check_rows(sp_model, task, examples, data_file or f"the {split} split")
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
    kind = model_kind(base)
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
    # With a data file, every split is that file (read and its labels checked by `load_data`).
    examples = data.test if data_file else (
        {"train": data.train, "dev": data.dev, "test": data.test}[split] if split in ("train", "dev", "test") else None)
    if examples is None:
        raise ConfigError(f"split must be train, dev or test, got {split!r}")
    check_rows(sp_model, task, examples, data_file or f"the {split} split", labels=False)  # labels: by `load_data`
    task.bind(sp_model)
    with sp_model.disable_prompt():
        scores, _ = evaluate(sp_model, task, examples, batch_size)
    return {"split": split if not data_file else data_file, "template": template, **scores}


def read_inputs(model: SoftPromptModel, task: Task, texts: list[str], input_file: Path | None,
                fields: list[str] | None = None) -> list[dict]:
    """Examples for `predict` with `task`: plain texts fill the template's only field; a
    data file gives whole examples, each row checked (`check_rows`, without targets), its
    columns renamed by `fields` (``COLUMN:FIELD``, as `softprompt train --field`).

    Raises:
        DataError: a text that is not valid Unicode (an argument in no UTF-8, read by
            Python as lone surrogates), or a bad row of the file (file, line, field).
    """
    examples: list[dict] = []
    if texts:
        fields = model.template.fields
        if len(fields) != 1:
            raise ConfigError(f"the template {model.template.source!r} has fields {list(fields)}: use --input FILE.jsonl")
        for i, text in enumerate(texts):
            problem = datamod.unicode_problem(text)
            if problem:
                raise datamod.DataError(f"input {i + 1} {problem}: the command line held bytes that are not UTF-8")
        examples += [{fields[0]: t.split() if fields[0] == "tokens" else t} for t in texts]
    if input_file is not None:
        rows = datamod.read_examples(input_file, fields=parse_fields(fields))
        check_rows(model, task, rows, str(input_file), targets=False)
        examples += rows
    if not examples:
        raise ConfigError("nothing to predict: give texts or --input FILE.jsonl")
    return examples


__all__ = ["evaluate", "evaluate_saved", "evaluate_trained", "evaluate_zero_shot", "read_inputs"]
