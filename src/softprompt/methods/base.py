"""What every soft-prompt method shares: its config contract and its module contract.

A method is a config dataclass plus an `nn.Module` whose `forward()` returns the
training-time prompt and whose `export()` collapses it into the plain inference tensor:

* input methods (prompt tuning, P-tuning): an embedding table ``[P, D]`` whose rows
  replace the template's virtual slots;
* deep methods (prefix tuning, P-tuning v2): a key/value prefix ``[L, 2, H_kv, P, D_head]``
  for every self-attention layer.

An input method may add a second inference tensor beside its table: an additive input delta
``[S_max, D]`` over the row's real tokens (DePT, `input_delta` / `export_input_delta`).

Methods know nothing of tasks, templates' tokenization or serving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..architecture import ModelSpec
from ..errors import ConfigError
from ..template import Template, default_template, parse_template
from . import peft_names


class _TakesPeftNames(type):
    """Lets a method config take HF PEFT's keyword names where they mean what one of its own
    fields means, and refuse the others with where their meaning lives (`peft_names`): they
    are put as ours before the dataclass's own ``__init__`` runs, so a config only ever
    holds, compares, saves and prints softprompt's fields."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **peft_names.to_ours(cls, kwargs))


@dataclass
class PromptConfig(metaclass=_TakesPeftNames):
    """Fields every method has (and, as keywords, PEFT's names for them: `peft_names`).

    Attributes:
        num_virtual_tokens: P. For input methods it may be left out when the template
            says it (``[P:3] ... [P:2]`` gives 5); if both are given they must agree.
        template: where the virtual tokens, fields and answer go; default ``"[P:N] {text}"``
            for input methods and ``"{text}"`` for deep ones (their prompt is in every layer).
    """

    method: ClassVar[str] = ""
    deep: ClassVar[bool] = False
    #: the prompt has a second inference tensor, an additive input delta (DePT)
    adds_input_delta: ClassVar[bool] = False

    num_virtual_tokens: int | None = None
    template: str | None = None

    def resolve(self) -> tuple[Template, int]:
        """Validate and return the parsed template and P.

        Raises:
            ConfigError: P missing or not positive, or disagreeing with the template.
            TemplateError: the template does not parse.
        """
        n = self.num_virtual_tokens
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ConfigError(f"{type(self).__name__}.num_virtual_tokens must be a positive integer, got {n!r}")
        if self.template is None:
            if n is None:
                raise ConfigError(f"{type(self).__name__}: give num_virtual_tokens or a template with [P:n] slots")
            return parse_template(default_template(n, deep=self.deep)), n
        template = parse_template(self.template)
        slots = template.num_virtual_tokens
        if self.deep:
            if slots:
                raise ConfigError(
                    f"{type(self).__name__} puts its prompt in every layer's keys and values, not in the input: "
                    f"remove the [P:n] slots from template {self.template!r} and set num_virtual_tokens"
                )
            if n is None:
                raise ConfigError(f"{type(self).__name__}.num_virtual_tokens is required for a deep prompt")
            return template, n
        if slots == 0:
            raise ConfigError(f"template {self.template!r} has no virtual-token slot such as [P:3]")
        if n is not None and n != slots:
            raise ConfigError(
                f"num_virtual_tokens={n} but template {self.template!r} has {slots} virtual tokens"
            )
        return template, slots

    def validate(self) -> None:
        """Check method-specific fields (override in subclasses); `resolve()` checks the shared ones."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "PromptConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = peft_names.to_ours(cls, {k: v for k, v in data.items() if k != "method"})
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
        return cls(**data)


def _positive(config: PromptConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def _probability(config: PromptConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{type(config).__name__}.{name} must be in [0, 1), got {value!r}")


class PromptModule(nn.Module):
    """A method's trainable part.

    `forward()` returns the training-time prompt (dropout and reparameterisation
    included); `export()` returns the collapsed inference tensor, detached, in fp32.
    """

    deep: ClassVar[bool] = False

    def __init__(self, num_virtual_tokens: int, spec: ModelSpec):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.spec = spec

    def forward(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_delta(self) -> torch.Tensor | None:
        """The training-time additive delta of the input embeddings, (S_max, D): row j is
        added to the embedding of the row's j-th real token (`inject.add_input_delta`);
        None: the method has none (every method but DePT)."""
        return None

    def delta_parameters(self) -> list[nn.Parameter]:
        """The parameters of `input_delta` (DePT's low-rank pair): trained at their own
        learning rate (``train.delta_lr``); [] for methods without a delta."""
        return []

    def export(self) -> torch.Tensor:
        """Collapse into the inference tensor: ``[P, D]`` (input) or ``[L, 2, H_kv, P, D_head]`` (deep)."""
        return self._collapsed(self)

    def export_input_delta(self) -> torch.Tensor | None:
        """The collapsed input delta ``[S_max, D]`` (fp32, detached), or None."""
        return None if self.input_delta() is None else self._collapsed(self.input_delta)

    def _collapsed(self, part) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            # Run as in training (grad mode on): PyTorch's LSTM takes another kernel under
            # no_grad, and the exported table should equal the trained module bit for bit.
            with torch.enable_grad():
                return part().detach().float().clone()
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


__all__ = ["PromptConfig", "PromptModule", "field"]
