"""Prompt tuning (Lester et al. 2021): a trainable table of input embeddings, optionally
reparameterised with a residual MLP while training (residual prompt tuning: Razdaibiedina
et al. 2023, "Residual Prompt Tuning: Improving Prompt Tuning with Residual
Reparameterization")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architecture import ModelSpec
from ..errors import ConfigError
from .base import PromptConfig, PromptModule, _positive

INITS = ("random", "vocab", "text", "labels", "prompt")
REPARAMETERIZATIONS = ("none", "residual")


@dataclass
class PromptTuningConfig(PromptConfig):
    """Prompt tuning.

    Attributes:
        init: ``random`` (normal with the vocabulary embeddings' std), ``vocab`` (rows
            sampled from the vocabulary embeddings), ``text`` (embeddings of `init_text`,
            repeated / truncated to P) or ``labels`` (embeddings of `label_words`, the
            remaining rows sampled from the vocabulary, as in the paper) or ``prompt``:
            another trained prompt of the same base (`init_prompt`, a prompt folder of an
            input method), resampled to P (prompt transfer: SPoT, Vu et al. 2022).
        init_text: the string for ``init="text"``.
        init_prompt: the prompt folder for ``init="prompt"``.
        label_words: the words for ``init="labels"``.
        init_seed: seed for the sampled initialisations (and the residual MLP's).
        reparameterization: ``none`` (the table is the prompt) or ``residual``: while
            training each virtual token's vector p goes through a shared bottleneck MLP
            with a skip connection, p + LayerNorm(W_up ReLU(W_down p)) (residual prompt
            tuning); the saved prompt is that output, so it serves as a plain table.
        residual_hidden_size: the MLP's bottleneck width (``residual`` only).
    """

    method = "prompt-tuning"
    deep = False

    init: str = "random"
    init_text: str | None = None
    label_words: list[str] | None = None
    init_seed: int = 0
    init_prompt: str | None = None
    reparameterization: str = "none"
    residual_hidden_size: int = 400

    def validate(self) -> None:
        validate_init(self)
        if self.reparameterization not in REPARAMETERIZATIONS:
            raise ConfigError(f"PromptTuningConfig.reparameterization must be one of {REPARAMETERIZATIONS}, "
                              f"got {self.reparameterization!r}")
        _positive(self, "residual_hidden_size")

    def to_dict(self) -> dict:
        # a prompt without the reparameterisation is written as before it existed: older
        # softprompt versions, which refuse fields they do not know, still read its folder
        data = super().to_dict()
        if self.reparameterization == "none":
            for name in ("reparameterization", "residual_hidden_size"):
                data.pop(name)
        return data


def validate_init(config) -> None:
    """Check the table's init fields (`init`, `init_text`, `label_words`, `init_prompt`) of a
    config that starts an input table as prompt tuning does (prompt tuning, DePT)."""
    name = type(config).__name__
    if config.init not in INITS:
        raise ConfigError(f"{name}.init must be one of {INITS}, got {config.init!r}")
    if config.init == "text" and not config.init_text:
        raise ConfigError(f"{name}.init='text' needs init_text")
    if config.init == "labels" and not config.label_words:
        raise ConfigError(f"{name}.init='labels' needs label_words")
    if config.init == "prompt" and not config.init_prompt:
        raise ConfigError(f"{name}.init='prompt' needs init_prompt (a trained prompt's folder)")


def _sample_vocab_rows(weight: torch.Tensor, n: int, generator: torch.Generator, exclude: set[int]) -> torch.Tensor:
    allowed = torch.tensor([i for i in range(weight.shape[0]) if i not in exclude]) if exclude else None
    pool = weight.shape[0] if allowed is None else len(allowed)
    picks = torch.randint(0, pool, (n,), generator=generator)
    ids = picks if allowed is None else allowed[picks]
    return _rows(weight, ids)


def _rows(weight: torch.Tensor, ids) -> torch.Tensor:
    """Rows `ids` of the embedding table as a new fp32 CPU tensor: (len(ids), D)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    return weight[ids.to(weight.device)].float().cpu()


def initial_table(config: PromptTuningConfig, P: int, embeddings: torch.Tensor, tokenizer) -> torch.Tensor:
    """The ``[P, D]`` starting table for `config.init` (fp32, on CPU)."""
    # Only the rows (or the one statistic) the init reads leave the table's device: a
    # copy of a 128k-word table to the host costs a second per prompt.
    weight = embeddings.detach()
    generator = torch.Generator().manual_seed(config.init_seed)
    specials = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    if config.init in ("random", "prompt"):  # "prompt": set from the other prompt once the base is known
        return torch.randn(P, weight.shape[1], generator=generator) * weight.float().std().item()
    if config.init == "vocab":
        return _sample_vocab_rows(weight, P, generator, specials)
    if tokenizer is None:
        raise ConfigError(f"{type(config).__name__}.init={config.init!r} needs the tokenizer: pass tokenizer=...")
    if config.init == "text":
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"{type(config).__name__}.init_text {config.init_text!r} tokenizes to nothing")
        ids = (ids * (P // len(ids) + 1))[:P]
        return _rows(weight, ids)
    ids = [i for word in config.label_words for i in tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]]
    rows = _rows(weight, ids[:P])
    if len(rows) < P:
        rows = torch.cat([rows, _sample_vocab_rows(weight, P - len(rows), generator, specials)])
    return rows


class ResidualMLP(nn.Module):
    """Residual prompt tuning's reparameterisation, shared by the P vectors:
    ``p -> p + LayerNorm(W_up ReLU(W_down p))``, (P, D) -> (P, D).

    The LayerNorm's gain starts at `scale`, the vocabulary embeddings' std, not at 1: its
    output has unit variance per vector, and beside embeddings of std 0.14 (SmolLM2-135M)
    or 0.056 (all-MiniLM-L6-v2) that would start every virtual token 7 to 18 times off
    the scale of a real token's embedding."""

    def __init__(self, D: int, H: int, scale: float = 1.0):
        super().__init__()
        self.down, self.up, self.norm = nn.Linear(D, H), nn.Linear(H, D), nn.LayerNorm(D)
        with torch.no_grad():
            self.norm.weight.fill_(scale)

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return table + self.norm(self.up(torch.relu(self.down(table))))


class PromptTuning(PromptModule):
    """The table is the prompt, ``forward() -> [P, D]``; with the residual
    reparameterisation, the table through `ResidualMLP` (`export` keeps that output)."""

    def __init__(self, config: PromptTuningConfig, P: int, spec: ModelSpec, embeddings: torch.Tensor, tokenizer=None):
        super().__init__(P, spec)
        self.embedding = nn.Parameter(initial_table(config, P, embeddings, tokenizer))  # (P, D)
        self.residual = None
        if config.reparameterization == "residual":
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(config.init_seed)  # reproducible init without a generator argument on nn layers
            try:
                scale = embeddings.detach().float().std().item()
                self.residual = ResidualMLP(spec.hidden_size, config.residual_hidden_size, scale)
            finally:
                torch.random.set_rng_state(generator_state)

    @torch.no_grad()
    def start_from(self, table: torch.Tensor) -> None:
        """Set the table to `table` (P, D) (another prompt's, resampled: prompt transfer)."""
        self.embedding.copy_(table)

    def forward(self) -> torch.Tensor:
        if self.residual is None:
            return self.embedding  # (P, D)
        return self.residual(self.embedding)  # (P, D)
