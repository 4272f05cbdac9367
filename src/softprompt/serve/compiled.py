"""Base-model forwards through `torch.compile` with dynamic shapes, for the engine's
batches whose rows and length change from one call to the next (a decoder's joins, a
batch of head requests). The decode step is not one of them: it runs on fixed slots and is
compiled before its CUDA graph is captured (`slots.py`).

Dynamic shapes keep the compiled versions few: dynamo specialises sizes 0 and 1, so a
batch of one row and a batch of more compile apart, and so do inputs of another structure
(a cache that starts with a prefix or empty); every length shares one version. Duck
shaping is off while it compiles: it gives sizes that happen to be equal one symbol, so a
batch whose length equalled the head dimension (64 tokens, head dimension 64) compiled a
version for that length alone, one more compile of tens of seconds for a 1B model on a GPU.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import torch
import torch.fx.experimental._config as fx_config

log = logging.getLogger("softprompt.serve")

T = TypeVar("T")
Forward = Callable[[Any, dict[str, Any]], Any]  # (base, keyword arguments) -> the base's output


class CompiledForward:
    """`forward` (``forward(base, inputs)``), compiled where asked, with its fallback.

    Args:
        forward: a module-level function (its compiled versions are counted on its code
            object, apart from every other compile of the model).
        options: False: never compiled; True or `torch.compile`'s keyword arguments.
        what: its name in the fallback's warning.
    """

    def __init__(self, forward: Forward, options: bool | dict, what: str):
        self.forward = forward
        self.what = what
        self._compiled = _dynamic(forward, options) if options else None

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def run(self, call: Callable[[Forward], T]) -> T:
        """``call(forward)`` with the compiled forward. Where that raises, ``call`` runs
        again with the uncompiled one (its inputs built afresh: a cache may be half-written):
        if that succeeds, the compiler was at fault and the forward stays uncompiled from
        then on (one warning); if it fails too, the inputs were (their error is raised, the
        compiled forward kept)."""
        if self._compiled is None:
            return call(self.forward)
        try:
            return call(self._compiled)
        except Exception as e:
            out = call(self.forward)
            log.warning("%s not compiled (%s: %s); running it uncompiled", self.what, type(e).__name__, e)
            self._compiled = None
            return out


def _dynamic(forward: Forward, options: bool | dict) -> Forward:
    options = dict(options) if isinstance(options, dict) else {}
    options.setdefault("dynamic", True)
    compiled = torch.compile(forward, **options)

    def run(base, inputs: dict[str, Any]):
        with fx_config.patch(use_duck_shape=False):
            return compiled(base, inputs)

    return run


__all__ = ["CompiledForward"]
