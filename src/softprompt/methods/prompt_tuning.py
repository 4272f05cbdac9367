"""Prompt tuning (Lester et al. 2021): a trainable table of input embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..architecture import ModelSpec
from ..errors import ConfigError
from .base import PromptConfig, PromptModule

INITS = ("random", "vocab", "text", "labels", "prompt")


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
        init_seed: seed for the sampled initialisations.
    """

    method = "prompt-tuning"
    deep = False

    init: str = "random"
    init_text: str | None = None
    label_words: list[str] | None = None
    init_seed: int = 0
    init_prompt: str | None = None

    def validate(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"PromptTuningConfig.init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError("PromptTuningConfig.init='text' needs init_text")
        if self.init == "labels" and not self.label_words:
            raise ConfigError("PromptTuningConfig.init='labels' needs label_words")
        if self.init == "prompt" and not self.init_prompt:
            raise ConfigError("PromptTuningConfig.init='prompt' needs init_prompt (a trained prompt's folder)")


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
        raise ConfigError(f"PromptTuningConfig.init={config.init!r} needs the tokenizer: pass tokenizer=...")
    if config.init == "text":
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"PromptTuningConfig.init_text {config.init_text!r} tokenizes to nothing")
        ids = (ids * (P // len(ids) + 1))[:P]
        return _rows(weight, ids)
    ids = [i for word in config.label_words for i in tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]]
    rows = _rows(weight, ids[:P])
    if len(rows) < P:
        rows = torch.cat([rows, _sample_vocab_rows(weight, P - len(rows), generator, specials)])
    return rows


class PromptTuning(PromptModule):
    """The table itself is the prompt: ``forward() -> [P, D]``."""

    def __init__(self, config: PromptTuningConfig, P: int, spec: ModelSpec, embeddings: torch.Tensor, tokenizer=None):
        super().__init__(P, spec)
        self.embedding = nn.Parameter(initial_table(config, P, embeddings, tokenizer))  # (P, D)

    @torch.no_grad()
    def start_from(self, table: torch.Tensor) -> None:
        """Set the table to `table` (P, D) (another prompt's, resampled: prompt transfer)."""
        self.embedding.copy_(table)

    def forward(self) -> torch.Tensor:
        return self.embedding  # (P, D)
