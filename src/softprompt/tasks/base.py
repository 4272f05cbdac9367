"""The task contract: what a task adds on top of a SoftPromptModel.

A task owns its head (trainable parameters, possibly none), turns examples into model
inputs plus targets, computes the loss, decodes predictions and scores them. The
training loop, `softprompt eval` and `softprompt predict` talk to tasks only through
this interface, so a new task is one file. Serving and the prompt cache ask a task what
it can do through its capabilities (`generates`, `answer_only`, `word_field`,
`endpoint`), never by its class or kind name.

Examples are plain dicts. Conventions for the reserved keys:

    classification   {<template fields>..., "label": str}
    ner              {"tokens": [str, ...], "tags": [str, ...]}         (BIO tags)
    generation       {<template fields>..., "target": str}
    lama             {"X": subject, "Y": object, "relation": "P19"}

A missing reserved key is allowed at predict time (no target needed).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..batch import PromptBatch

Targets = dict[str, torch.Tensor]


class Task(nn.Module):
    """Base class of every task.

    Attributes:
        kind: the task's name on the command line (``classification``, ``ner``, ...).
        metric: the key of `metrics()` that model selection and early stopping maximise.

    Capabilities (what serving asks of a task):
        generates: its prediction is generated text: a server decodes its rows (with
            `generate_options` and `decode`) instead of reading a head.
        answer_only: it reads no outputs of the tokens before its first field, only the
            answer slot or generated tokens (a cached leading segment loses nothing).
        word_field: the template field whose text input is a list of words (a text
            sent to a server is split at whitespace), or None.
        endpoint: the HTTP endpoint that answers with its predictions (``classify``,
            ``tag``, ``completions``).
    """

    kind: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    #: What `predict` reads of a forward (keyword arguments of `SoftPromptModel.forward`),
    #: so that a caller who ran the forward already (a mixed-task batch) can hand it over.
    reads: ClassVar[dict[str, Any]] = {}
    generates: ClassVar[bool] = False
    answer_only: ClassVar[bool] = False
    endpoint: ClassVar[str] = "classify"

    @property
    def word_field(self) -> str | None:
        return None

    def bind(self, model) -> None:
        """Called once with the SoftPromptModel before training or inference: resolve
        anything that depends on the model or tokenizer (label-word ids, head sizes),
        and check it (a label word missing from the vocabulary is an error here)."""

    def collate(self, model, examples: Sequence[dict[str, Any]], *, with_targets: bool = True) -> tuple[PromptBatch, Targets]:
        """Encode `examples` for the model and build their targets.

        Returns:
            (batch, targets): `batch` goes to ``model(**batch)``; `targets` holds the
            tensors `loss` needs (empty when `with_targets` is False).
        """
        raise NotImplementedError

    def loss(self, model, batch: PromptBatch, targets: Targets) -> torch.Tensor:
        """Scalar training loss of one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model, batch: PromptBatch, out=None) -> list[Any]:
        """One JSON-serialisable prediction per row.

        Args:
            out: the output of a forward over `batch` already run with at least `reads`
                (None: run ``model(**batch, **reads)`` here).
        """
        raise NotImplementedError

    def generate_options(self) -> dict[str, Any]:
        """A generating task's decoding settings (transformers `generate` names)."""
        raise NotImplementedError

    def decode(self, tokenizer, new: torch.Tensor) -> list[str]:
        """A generating task's (B, N) new tokens -> its B texts."""
        raise NotImplementedError

    def annotate(self, batch: PromptBatch, examples: Sequence[dict[str, Any]]) -> None:
        """Attach to a batch built elsewhere (a mixed-task batch) what `predict` needs of
        the examples beyond the tensors (e.g. word counts)."""

    def reference(self, example: dict[str, Any]) -> Any:
        """The gold answer of one example, in the form `predict` returns."""
        raise NotImplementedError

    def metrics(self, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Scores of predictions against references; includes `self.metric`."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this task with `from_config`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Task":
        raise NotImplementedError

    def num_tokens(self, batch: PromptBatch) -> torch.Tensor:
        """Tokens the model processes for `batch` (for tokens/s), as a 0-dim tensor on the
        batch's device: the training loop adds them up without waiting for the device."""
        return batch["attention_mask"].sum()
