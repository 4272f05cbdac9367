"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens from a prompt encoder.

The paper's encoder is a bidirectional 2-layer LSTM over the virtual-token embeddings
followed by a 2-layer MLP with ReLU; an MLP-only encoder is the lighter variant. The
encoder only exists while training: `export()` runs it once and keeps its output table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architecture import ModelSpec
from ..errors import ConfigError
from .base import PromptConfig, PromptModule, _positive, _probability

ENCODERS = ("lstm", "mlp")


@dataclass
class PTuningConfig(PromptConfig):
    """P-tuning.

    Attributes:
        encoder: ``lstm`` (bi-LSTM + MLP, the paper's) or ``mlp``.
        encoder_hidden_size: width of the encoder; default D (the model's hidden size).
        encoder_dropout: dropout in and after the LSTM / inside the MLP, while training.
        init_seed: seed of the encoder's initialisation.
    """

    method = "p-tuning"
    deep = False

    encoder: str = "lstm"
    encoder_hidden_size: int | None = None
    encoder_dropout: float = 0.0
    init_seed: int = 0

    def validate(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(f"PTuningConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None:
            _positive(self, "encoder_hidden_size")
            if self.encoder == "lstm" and self.encoder_hidden_size % 2:
                raise ConfigError(
                    "PTuningConfig.encoder_hidden_size must be even for the bidirectional LSTM "
                    f"(half per direction), got {self.encoder_hidden_size}"
                )
        _probability(self, "encoder_dropout")


class PTuning(PromptModule):
    """``forward() -> [P, D]``: the prompt encoder applied to P trainable input vectors."""

    def __init__(self, config: PTuningConfig, P: int, spec: ModelSpec, embeddings: torch.Tensor, tokenizer=None):
        super().__init__(P, spec)
        D = spec.hidden_size
        H = config.encoder_hidden_size or D
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.init_seed)  # reproducible init without a generator argument on nn layers
        try:
            self.embedding = nn.Parameter(torch.randn(P, D) * embeddings.detach().float().std().cpu())  # (P, D)
            self.encoder_type = config.encoder
            if config.encoder == "lstm":
                self.lstm = nn.LSTM(
                    input_size=D, hidden_size=H // 2, num_layers=2, dropout=config.encoder_dropout,
                    bidirectional=True, batch_first=True,
                )
                self.mlp = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D))
            else:
                self.mlp = nn.Sequential(
                    nn.Linear(D, H), nn.ReLU(), nn.Dropout(config.encoder_dropout), nn.Linear(H, D)
                )
            self.dropout = nn.Dropout(config.encoder_dropout)
        finally:
            torch.random.set_rng_state(generator_state)

    def forward(self) -> torch.Tensor:
        x = self.embedding.unsqueeze(0)  # (1, P, D)
        if self.encoder_type == "lstm":
            x = self.dropout(self.lstm(x)[0])  # (1, P, H)
        return self.mlp(x).squeeze(0)  # (P, D)
