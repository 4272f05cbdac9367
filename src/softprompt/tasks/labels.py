"""What every task that picks one of a fixed set of labels shares: label ids as targets,
the loss over label scores, predictions with per-label probabilities, and accuracy /
macro-F1."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import EncodingError
from ..transfer import tensor_on
from .base import Targets, Task
from .metrics import classification_metrics


class LabelTask(Task):
    """A task whose `scores(model, batch)` gives (B, num_labels) unnormalised label scores;
    subclasses set `self.labels` and implement `scores`."""

    metric = "accuracy"
    labels: list[str]

    def scores(self, model, batch, out=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def label_id(self, example: Mapping[str, Any], index: int) -> int:
        """The position of the example's ``label`` in `labels`.

        Raises:
            EncodingError: no label, or one not in `labels`.
        """
        if "label" not in example:
            raise EncodingError(f"example {index} has no 'label' field")
        label = str(example["label"])
        if label not in self.labels:
            raise EncodingError(f"example {index}: unknown label {label!r}; known labels: {self.labels}")
        return self.labels.index(label)

    def collate(self, model, examples, *, with_targets=True):
        """The encoded rows; targets ``labels`` (B,) label ids."""
        batch = model.encode(list(examples))
        targets: Targets = {}
        if with_targets:
            targets["labels"] = tensor_on([self.label_id(e, i) for i, e in enumerate(examples)], model.device)
        return batch, targets

    def loss(self, model, batch, targets):
        return F.cross_entropy(self.scores(model, batch), targets["labels"])

    @torch.no_grad()
    def predict(self, model, batch, out=None):
        probs = self.scores(model, batch, out).softmax(-1)
        return [
            {"label": self.labels[int(p.argmax())], "scores": {l: round(float(s), 6) for l, s in zip(self.labels, p)}}
            for p in probs
        ]

    def reference(self, example):
        return str(example["label"])

    def metrics(self, predictions, references):
        return classification_metrics([p["label"] for p in predictions], list(references), self.labels)
