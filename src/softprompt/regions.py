"""Views of a frozen base model with its repeated blocks wrapped: compiled, checkpointed.

A transformer is mostly one block class repeated L times. Two training-speed tools act on
those blocks:

* regional compilation (`torch.compile` of one block; every block shares the compiled
  code, so it compiles once, in seconds, and re-runs for new shapes stay cheap);
* activation checkpointing (each block keeps only its input for the backward pass and
  recomputes the rest), which trades one more forward for the block's activations.

Both are applied to a *view*: a shallow copy of the base whose module tree holds the
wrapped blocks and shares every parameter and buffer with the base. The base itself is
never modified, so the same frozen model keeps serving, evaluating and generating as it
is (`SoftPromptModel.accelerated` installs a view for training only).

transformers' own gradient checkpointing is not used: it drops ``past_key_values`` under
checkpointing, i.e. it would silently train a deep prompt (prefix tuning, P-tuning v2)
without its prefix. Here the deep prefix is a read-only cache (`inject.PrefixCache`), so
a block can be recomputed on it.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError


class Checkpointed(nn.Module):
    """A block that saves only its inputs for the backward pass and recomputes the rest
    (non-reentrant `torch.utils.checkpoint`: keyword arguments and tensors inside a cache
    object get their gradients)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of its blocks (e.g. ``layer.attention_type``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


def _is_repeated(module: nn.Module) -> bool:
    return (isinstance(module, nn.ModuleList) and len(module) > 1
            and all(type(m) is type(module[0]) for m in module))


def _has_repeated(module: nn.Module) -> bool:
    return any(_is_repeated(m) for m in module.modules())


def _view(module: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    if _is_repeated(module):
        return nn.ModuleList(wrap(block) for block in module)
    return rebuilt(module, lambda m: None, _has_repeated, lambda child: _view(child, wrap))


def rebuilt(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None],
            holds: Callable[[nn.Module], bool], descend: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """`module` with the submodules `replace` gives a new module for replaced, as shallow
    copies of the modules on the way to them (the rest shared, `module` not modified).

    Args:
        replace: a module's replacement, or None to keep it (and look inside).
        holds: whether a module has something to replace inside (False: shared as it is).
        descend: how a child is rebuilt (default: the same rebuild).
    """
    new = replace(module)
    if new is not None:
        return new
    if not holds(module):
        return module
    descend = descend or (lambda child: rebuilt(child, replace, holds))
    view = module.__class__.__new__(module.__class__)
    view.__dict__.update(module.__dict__)
    for name, value in list(view.__dict__.items()):  # methods bound to the original: rebind to the copy
        if getattr(value, "__self__", None) is module and hasattr(value, "__func__"):
            view.__dict__[name] = MethodType(value.__func__, view)
    view._modules = {name: descend(child) for name, child in module.named_children()}
    return view


def repeated_blocks(base: nn.Module) -> int:
    """How many blocks of `base` sit in a list of one repeated class (0: none found)."""
    return sum(len(m) for m in base.modules() if _is_repeated(m))


def recompile_limit(base: nn.Module) -> int:
    """Compiled graphs one training run of `base` may need: transformers' blocks index a
    cache by an integer attribute (``layer_idx``), which compilation treats as a constant,
    so a forward with a deep prompt compiles once per block (identical graphs, so the
    compiler's cache makes the copies cheap), twice over (the first block's input needs no
    gradient), plus shapes that change."""
    return 2 * repeated_blocks(base) + 8


def view(base: nn.Module, *, compile: bool = False, checkpointing: bool = False,
         compile_options: dict[str, Any] | None = None, float8: bool = False) -> nn.Module:
    """`base` with each repeated block checkpointed and/or compiled (see the module docs).

    Args:
        base: a transformers model; it is not modified.
        compile: `torch.compile` each block (regional compilation).
        checkpointing: recompute each block's activations in the backward pass.
        compile_options: keyword arguments of `torch.compile` (``backend``, ``mode``, ...).
        float8: each block's frozen linear layers run their products in FP8
            (`float8.Float8Frozen`; the LM head and embeddings stay as they are).

    Returns:
        A module that runs like `base` and shares its parameters; `base` itself when
        neither option is on.

    Raises:
        ConfigError: `base` has no list of repeated blocks to wrap.
    """
    if not (compile or checkpointing or float8):
        return base
    if not repeated_blocks(base):
        raise ConfigError(f"{type(base).__name__} has no list of repeated blocks to compile, checkpoint or run in FP8")
    options = dict(compile_options or {})
    if float8:
        from . import float8 as fp8

        fp8.check(type(base).__name__, [block for m in base.modules() if _is_repeated(m) for block in m])

    def wrap(block: nn.Module) -> nn.Module:
        if float8:  # a copy of the block with its frozen linear layers in FP8
            block = rebuilt(block, fp8.replacement, fp8.holds_convertible)
        if checkpointing:
            block = Checkpointed(block)
        return torch.compile(block, **options) if compile else block

    return _view(base, wrap)


__all__ = ["view", "Checkpointed", "repeated_blocks", "recompile_limit"]
