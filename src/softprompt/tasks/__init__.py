"""Tasks: heads, targets, losses, predictions and metrics on top of a SoftPromptModel.

A task is one file: a `Task` subclass (base.py) with its collate / loss / predict / metrics and
what it can do (`generates`, `answer_only`, `word_field`, `endpoint`), which is all the trainer
and the server ask of it. The label tasks (a classification head, a verbalizer) share
`LabelTask` (labels.py)."""

from __future__ import annotations

from typing import Any

from ..data.lama import lama_template  # the one home of LAMA's template conversion
from ..errors import ConfigError
from .base import Task
from .classification import SequenceClassification
from .generation import Generation
from .lama import KnowledgeProbe
from .scoring import row_log_probs, sequence_log_probs
from .token_classification import TokenClassification
from .verbalizer import Verbalizer

TASKS: dict[str, type[Task]] = {
    cls.kind: cls for cls in (SequenceClassification, Verbalizer, TokenClassification, Generation, KnowledgeProbe)
}


def task_from_config(config: dict[str, Any]) -> Task:
    """Rebuild a task from `Task.to_config()` output."""
    kind = config.get("kind")
    if kind not in TASKS:
        raise ConfigError(f"unknown task kind {kind!r}; known: {sorted(TASKS)}")
    return TASKS[kind].from_config(config)


__all__ = [
    "TASKS",
    "Task",
    "SequenceClassification",
    "Verbalizer",
    "TokenClassification",
    "Generation",
    "KnowledgeProbe",
    "lama_template",
    "sequence_log_probs",
    "row_log_probs",
    "task_from_config",
]
