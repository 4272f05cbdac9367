"""A prompt loaded in its collapsed inference form: the tensor itself, nothing to run."""

from __future__ import annotations

import torch
from torch import nn

from ..architecture import ModelSpec
from .base import PromptModule


class CollapsedPrompt(PromptModule):
    """Holds an exported prompt: (P, D) for input methods, (L, 2, H_kv, P, D_head) for deep ones,
    and an input method's additive input delta (S_max, D) where it has one (DePT).

    Frozen by default (it serves); set ``prompt.table.requires_grad_(True)`` to tune it further.
    """

    def __init__(self, table: torch.Tensor, spec: ModelSpec, deep: bool, input_delta: torch.Tensor | None = None):
        P = table.shape[-2] if deep else table.shape[0]
        super().__init__(P, spec)
        self.deep = deep
        self.table = nn.Parameter(table, requires_grad=False)
        self.delta = None if input_delta is None else nn.Parameter(input_delta, requires_grad=False)

    @classmethod
    def of(cls, module: PromptModule) -> "CollapsedPrompt":
        """The collapsed form of a trained module: its exported table and input delta."""
        return cls(module.export(), module.spec, module.deep, module.export_input_delta())

    def forward(self) -> torch.Tensor:
        return self.table

    def input_delta(self) -> torch.Tensor | None:
        return self.delta
