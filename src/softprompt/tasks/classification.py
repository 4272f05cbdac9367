"""Sequence classification with a head (the P-tuning v2 setting): pooled states -> linear."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..architecture import ModelKind
from ..errors import ConfigError
from .labels import LabelTask

POOLS = ("first", "last", "mean")


class SequenceClassification(LabelTask):
    """A linear layer over a pooled token state, trained together with the prompt.

    Args:
        labels: the label names, in a fixed order (the head's output units).
        pool: ``first`` (the [CLS] / first real token: encoders, as in P-tuning v2),
            ``last`` (the last real token: causal LMs), ``mean`` (mean of the real tokens);
            default: ``last`` for causal LMs, ``mean`` otherwise (sentence encoders such as
            MiniLM are trained for mean pooling; ``first`` is P-tuning v2's choice for BERT).
        dropout: dropout on the pooled state while training.
    """

    kind = "classification"
    reads = {"output_hidden_states": True, "logits": "none"}

    def __init__(self, labels: Sequence[str], pool: str | None = None, dropout: float = 0.1):
        super().__init__()
        labels = [str(x) for x in labels]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ConfigError(f"classification needs at least two distinct labels, got {labels}")
        if pool is not None and pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
        self.labels = labels
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout
        self.head: nn.Linear | None = None

    def bind(self, model) -> None:
        if self.pool is None:
            self.pool = "last" if model.spec.kind is ModelKind.CAUSAL else "mean"
        if self.head is None:
            self.head = nn.Linear(model.spec.hidden_size, len(self.labels)).to(model.device)

    def scores(self, model, batch, out=None) -> torch.Tensor:
        """(B, num_labels)."""
        out = model(**batch, **self.reads) if out is None else out
        states, mask = out.last_hidden_state, out.attention_mask  # (B, T, D), (B, T)
        if self.pool == "mean":
            w = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            real = positions.masked_fill(mask == 0, -1 if self.pool == "last" else mask.shape[1])
            index = real.max(1).values if self.pool == "last" else real.min(1).values  # (B,)
            pooled = states[torch.arange(states.shape[0], device=states.device), index]
        return self.head(self.dropout(pooled.float()))

    def to_config(self):
        return {"kind": self.kind, "labels": self.labels, "pool": self.pool, "dropout": self.dropout_p}

    @classmethod
    def from_config(cls, config):
        return cls(config["labels"], pool=config.get("pool"), dropout=config.get("dropout", 0.1))
