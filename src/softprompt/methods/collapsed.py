"""A prompt loaded in its collapsed inference form: the tensor itself, nothing to run."""

from __future__ import annotations

import torch
from torch import nn

from ..architecture import ModelSpec
from .base import PromptModule


class CollapsedPrompt(PromptModule):
    """Holds an exported prompt: (P, D) for input methods, (L, 2, H_kv, P, D_head) for deep ones.

    Frozen by default (it serves); set ``prompt.table.requires_grad_(True)`` to tune it further.
    """

    def __init__(self, table: torch.Tensor, spec: ModelSpec, deep: bool):
        P = table.shape[-2] if deep else table.shape[0]
        super().__init__(P, spec)
        self.deep = deep
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self) -> torch.Tensor:
        return self.table
