"""Tasks: heads, targets, losses, predictions and metrics on top of a SoftPromptModel."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Task
from .classification import SequenceClassification

TASKS: dict[str, type[Task]] = {
    cls.kind: cls for cls in (SequenceClassification,)
}


def task_from_config(config: dict[str, Any]) -> Task:
    """Rebuild a task from `Task.to_config()` output."""
    kind = config.get("kind")
    if kind not in TASKS:
        raise ConfigError(f"unknown task kind {kind!r}; known: {sorted(TASKS)}")
    return TASKS[kind].from_config(config)


__all__ = ["TASKS", "Task", "SequenceClassification", "task_from_config"]
