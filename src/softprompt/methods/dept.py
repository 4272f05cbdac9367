"""DePT (Shi & Lipani, "DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning",
ICLR 2024): a shorter soft prompt P ``[m, D]`` plus a low-rank, position-wise update of the
frozen input embeddings, ``delta = s * A @ B`` with A ``[S_max, r]``, B ``[r, D]``, trained
with two learning rates (the prompt's ``train.lr``, the pair's ``train.delta_lr``).

Initialisation and scale follow the paper's code (github.com/ZhengxiangShi/DePT,
``peft/tuners/prompt_tuning_lora.py``, ``PromptEmbeddingLoRA``): A is Kaiming-uniform
(``a=sqrt(5)``), B is zero, so delta starts at 0 (LoRA-style: the model starts as plain
prompt tuning with the short prompt), and ``s = lora_alpha / sqrt(r)`` with its default
``lora_alpha = 8``. Its config's defaults are ``r=8``, ``max_length=256``; the README's GLUE
runs use m=40, r=45 on T5-Base (then m*D + r*(S_max + D) = 76,800 parameters, those of
100 virtual tokens), prompt LR 3e-1 / 4e-1 and low-rank LR searched over 5e-4, 5e-3, 3e-1.

Inference keeps two plain tensors: the table ``[m, D]`` (placed in the template's virtual
slots like prompt tuning's) and the delta ``[S_max, D]``, added to the embedding of the j-th
*real* token of each row (j counted over the row's attended, non-virtual tokens, its special
tokens and template text included; tokens from j = S_max on are left as they are). That
index does not depend on padding side, on the other rows of a batch, or on where the
template puts the virtual tokens (`inject.add_input_delta`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..architecture import ModelSpec
from ..errors import ConfigError
from .base import PromptConfig, PromptModule, _positive
from .prompt_tuning import initial_table, validate_init


@dataclass
class DePTConfig(PromptConfig):
    """DePT.

    Attributes:
        rank: r, the rank of the update ``A @ B`` (the paper's code: ``r``).
        max_input_length: S_max, the real tokens of a row the update covers (A's rows; the
            paper's code: ``max_length``); later tokens get no update.
        alpha: the update's scale is ``alpha / sqrt(rank)`` (the paper's code: ``lora_alpha``).
        init: how the short prompt P starts: as prompt tuning's (``random``, ``vocab``,
            ``text``, ``labels``, ``prompt``).
        init_text: the string for ``init="text"``.
        label_words: the words for ``init="labels"``.
        init_prompt: the prompt folder for ``init="prompt"`` (its table, resampled to P).
        init_seed: seed of P's sampled initialisation and of A's.
    """

    method = "dept"
    deep = False
    adds_input_delta = True

    rank: int = 8
    max_input_length: int = 256
    alpha: float = 8.0
    init: str = "random"
    init_text: str | None = None
    label_words: list[str] | None = None
    init_seed: int = 0
    init_prompt: str | None = None

    def validate(self) -> None:
        _positive(self, "rank")
        _positive(self, "max_input_length")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ConfigError(f"DePTConfig.alpha must be a positive number, got {self.alpha!r}")
        validate_init(self)


class LowRankDelta(nn.Module):
    """``delta = scale * A @ B``: (S_max, r) @ (r, D) -> (S_max, D)."""

    def __init__(self, S_max: int, r: int, D: int, scale: float, seed: int):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(S_max, r))
        self.B = nn.Parameter(torch.zeros(r, D))  # zero: the update starts at 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))

    def forward(self) -> torch.Tensor:
        return self.scale * (self.A @ self.B)  # (S_max, D)


class DePT(PromptModule):
    """``forward() -> [m, D]`` the short prompt; ``input_delta() -> [S_max, D]`` the update."""

    def __init__(self, config: DePTConfig, P: int, spec: ModelSpec, embeddings: torch.Tensor, tokenizer=None):
        super().__init__(P, spec)
        self.embedding = nn.Parameter(initial_table(config, P, embeddings, tokenizer))  # (m, D)
        self.low_rank = LowRankDelta(config.max_input_length, config.rank, spec.hidden_size,
                                     config.alpha / math.sqrt(config.rank), config.init_seed)

    @torch.no_grad()
    def start_from(self, table: torch.Tensor) -> None:
        """Set P to `table` (m, D) (another prompt's, resampled: prompt transfer)."""
        self.embedding.copy_(table)

    def forward(self) -> torch.Tensor:
        return self.embedding  # (m, D)

    def input_delta(self) -> torch.Tensor:
        return self.low_rank()  # (S_max, D)

    def delta_parameters(self) -> list[nn.Parameter]:
        return list(self.low_rank.parameters())

    def extra_repr(self) -> str:
        S_max, r = self.low_rank.A.shape
        return f"num_virtual_tokens={self.num_virtual_tokens}, rank={r}, max_input_length={S_max}"


__all__ = ["DePTConfig", "DePT", "LowRankDelta"]
