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


#: how a deep prefix starts (`PrefixTuningConfig.init`)
PREFIX_INITS = ("random", "zeros", "text", "prompt")


@dataclass
class PrefixTuningConfig(PromptConfig):
    """Prefix tuning.

    Attributes:
        projection: reparameterise with ``Embedding(P, D) -> Linear(D, h) -> tanh -> Linear(h, L*2*H_kv*D_head)``.
        projection_hidden_size: h (the paper's 512 for GPT-2).
        prefix_dropout: dropout on the prefix keys and values while training.
        init_std: std of the directly optimised prefix (no projection).
        init_seed: seed of the initialisation.
        init: ``random`` (normal, `init_std`), ``zeros`` (every key and value 0 at the
            start: with a projection, its last layer zeroed), or ``text``: the base model's
            own keys and values of `init_text` in every layer (its tokens repeated to P, or
            its first P), as if the text came before each row (causal LMs, no projection;
            PEFT's method comparison found it the best prefix start on GSM8K); or
            ``prompt``: another trained deep prompt of the same base (`init_prompt`, its
            folder), resampled to P (prompt transfer; no projection).
        init_text: the text for ``init="text"``.
        init_prompt: the prompt folder for ``init="prompt"``.
    """

    method = "prefix-tuning"
    deep = True

    projection: bool = True
    projection_hidden_size: int = 512
    prefix_dropout: float = 0.0
    init_std: float = 1.0
    init_seed: int = 0
    init: str = "random"
    init_text: str | None = None
    init_prompt: str | None = None

    def validate(self) -> None:
        if not isinstance(self.projection, bool):
            raise ConfigError(f"{type(self).__name__}.projection must be true or false, got {self.projection!r}")
        _positive(self, "projection_hidden_size")
        _probability(self, "prefix_dropout")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ConfigError(f"{type(self).__name__}.init_std must be positive, got {self.init_std!r}")
        name = type(self).__name__
        if self.init not in PREFIX_INITS:
            raise ConfigError(f"{name}.init must be one of {PREFIX_INITS}, got {self.init!r}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ConfigError(f"{name}.init='text' needs init_text (the text whose keys and values start the prefix)")
        if self.init == "prompt" and not self.init_prompt:
            raise ConfigError(f"{name}.init='prompt' needs init_prompt (a trained deep prompt's folder)")
        if self.init in ("text", "prompt") and self.projection:
            raise ConfigError(f"{name}.init={self.init!r} sets the prefix's keys and values themselves: it needs "
                              "projection=false (the MLP's output cannot be set to them)")


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
                if config.init == "zeros":  # the MLP's output is 0 at the start; its inner layers still learn
                    nn.init.zeros_(self.projection[2].weight)
                    nn.init.zeros_(self.projection[2].bias)
            else:
                scale = 0.0 if config.init == "zeros" else config.init_std
                self.embedding = nn.Parameter(torch.randn(P, width) * scale)  # (P, L*2*H*Dh)
                self.projection = None
        finally:
            torch.random.set_rng_state(state)
        self.dropout = nn.Dropout(config.prefix_dropout)

    @torch.no_grad()
    def start_from(self, kv: torch.Tensor) -> None:
        """Set the (unprojected) prefix to `kv` (L, 2, H_kv, P, D_head): `forward` gives it back."""
        if self.projection is not None:
            raise ConfigError("a projected prefix cannot be set to given keys and values")
        self.embedding.copy_(kv.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1))

    def forward(self) -> torch.Tensor:
        x = self.embedding if self.projection is None else self.projection(self.embedding)  # (P, L*2*H*Dh)
        L, two, H, Dh = self.shape
        x = self.dropout(x).view(self.num_virtual_tokens, L, two, H, Dh)
        return x.permute(1, 2, 3, 0, 4)  # (L, 2, H_kv, P, D_head)


@torch.no_grad()
def text_prefix(base, tokenizer, spec: ModelSpec, text: str, P: int) -> torch.Tensor:
    """The base model's own keys and values of `text` in every layer (L, 2, H_kv, P, D_head),
    float32: its tokens repeated to P, or its first P, at positions 0..P-1, where a deep
    prefix sits (`inject`): the prefix then starts as the text before every row."""
    from ..architecture import ModelKind
    from ..inject import output_cache

    if spec.kind is not ModelKind.CAUSAL:
        raise ConfigError(f"init='text' takes the keys and values of a causal LM's layers; {spec.model_type} is "
                          f"{spec.kind.value}: use init='random' or 'zeros'")
    if tokenizer is None:
        raise ConfigError("init='text' needs the tokenizer: pass tokenizer=...")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {text!r} tokenizes to nothing")
    ids = (ids * -(-P // len(ids)))[:P]
    device = base.get_input_embeddings().weight.device
    out = base(input_ids=torch.tensor([ids], device=device), use_cache=True)
    layers = output_cache(out).layers
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers]).float()
