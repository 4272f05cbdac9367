"""What every task that picks one of a fixed set of labels shares: the loss over label
scores, predictions with per-label probabilities, and accuracy / macro-F1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task
from .metrics import classification_metrics


class LabelTask(Task):
    """A task whose `scores(model, batch)` gives (B, num_labels) unnormalised label scores;
    subclasses set `self.labels` and implement `scores`."""

    metric = "accuracy"
    labels: list[str]

    def scores(self, model, batch, out=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

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
