"""Prefix tuning (Li & Liang 2021): trainable keys and values in every attention layer.

While training, the prefix is optionally reparameterised by an MLP over a small
embedding (the paper found direct optimisation unstable); `export()` keeps only the
resulting key/value prefix ``[L, 2, H_kv, P, D_head]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architecture import ModelSpec
from ..errors import ConfigError
from .base import PromptConfig, PromptModule, _positive, _probability


@dataclass
class PrefixTuningConfig(PromptConfig):
    """Prefix tuning.

    Attributes:
        projection: reparameterise with ``Embedding(P, D) -> Linear(D, h) -> tanh -> Linear(h, L*2*H_kv*D_head)``.
        projection_hidden_size: h (the paper's 512 for GPT-2).
        prefix_dropout: dropout on the prefix keys and values while training.
        init_std: std of the directly optimised prefix (no projection).
        init_seed: seed of the initialisation.
    """

    method = "prefix-tuning"
    deep = True

    projection: bool = True
    projection_hidden_size: int = 512
    prefix_dropout: float = 0.0
    init_std: float = 1.0
    init_seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.projection, bool):
            raise ConfigError(f"{type(self).__name__}.projection must be true or false, got {self.projection!r}")
        _positive(self, "projection_hidden_size")
        _probability(self, "prefix_dropout")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ConfigError(f"{type(self).__name__}.init_std must be positive, got {self.init_std!r}")


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2 (Liu et al. 2022): deep prompts in every layer, no reparameterisation by default."""

    method = "p-tuning-v2"
    deep = True

    projection: bool = False


class PrefixTuning(PromptModule):
    """``forward() -> [L, 2, H_kv, P, D_head]``: one key/value prefix per self-attention layer.

    L counts every stack that takes a prefix: the decoder of a causal LM, the encoder of
    an encoder model, encoder then decoder layers of an encoder-decoder.
    """

    deep = True

    def __init__(self, config: PrefixTuningConfig, P: int, spec: ModelSpec, embeddings: torch.Tensor | None = None, tokenizer=None):
        super().__init__(P, spec)
        self.shape = (spec.deep_layers, 2, spec.num_key_value_heads, spec.head_dim)
        width = spec.deep_layers * 2 * spec.num_key_value_heads * spec.head_dim
        state = torch.random.get_rng_state()
        torch.manual_seed(config.init_seed)
        try:
            if config.projection:
                self.embedding = nn.Parameter(torch.randn(P, spec.hidden_size))  # (P, D)
                self.projection = nn.Sequential(
                    nn.Linear(spec.hidden_size, config.projection_hidden_size),
                    nn.Tanh(),
                    nn.Linear(config.projection_hidden_size, width),
                )
            else:
                self.embedding = nn.Parameter(torch.randn(P, width) * config.init_std)  # (P, L*2*H*Dh)
                self.projection = None
        finally:
            torch.random.set_rng_state(state)
        self.dropout = nn.Dropout(config.prefix_dropout)

    def forward(self) -> torch.Tensor:
        x = self.embedding if self.projection is None else self.projection(self.embedding)  # (P, L*2*H*Dh)
        L, two, H, Dh = self.shape
        x = self.dropout(x).view(self.num_virtual_tokens, L, two, H, Dh)
        return x.permute(1, 2, 3, 0, 4)  # (L, 2, H_kv, P, D_head)
