"""Base-model forwards through `torch.compile` with dynamic shapes, for the engine's
batches whose rows and length change from one call to the next (a decoder's joins, a
batch of head requests). The decode step is not one of them: it runs on fixed slots and is
compiled before its CUDA graph is captured (`slots.py`); under ``regional`` its blocks are
compiled instead (`regional_call`).

Regional (``{"regional": True}`` among the options): each of the base's repeated blocks is
compiled instead of the whole forward (`regions.view`: one compile of a block serves every
block, the base itself is not modified), and what lies around the blocks (embeddings, the
final norm, the LM head, the forward's own gathers) runs as it is. A whole 16-layer forward
is a graph 16 times a block's: on a 2-core CPU, a narrow 16-layer Llama's dynamic-shape
forward compiled cold in 44.9 s whole and 3.0 s regionally (`bench.probe.compile_time`,
`bench/results/compile_time_cpu.json`; the GPU's times not measured yet);
`softprompt serve --compile`'s start-up, which compiles several versions of these
forwards, did not finish within 200 s for a 1B model on an H100.

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
        options: False: never compiled; True or `torch.compile`'s keyword arguments, with
            ``regional: True`` for the base's blocks compiled instead of the whole forward.
        what: its name in the fallback's warning.
    """

    def __init__(self, forward: Forward, options: bool | dict, what: str):
        self.forward = forward
        self.what = what
        regional = isinstance(options, dict) and options.get("regional", False)
        self._compiled = (_regional(forward, options) if regional else _dynamic(forward, options)) if options else None

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
    options = _compile_options(options)
    compiled = torch.compile(forward, **options)

    def run(base, inputs: dict[str, Any]):
        with fx_config.patch(use_duck_shape=False):
            return compiled(base, inputs)

    return run


def _compile_options(options: bool | dict, dynamic: bool | None = True) -> dict:
    options = {k: v for k, v in options.items() if k != "regional"} if isinstance(options, dict) else {}
    options.setdefault("dynamic", dynamic)
    return options


def regional_call(base, options: dict) -> Callable[..., Any]:
    """``base(**inputs)`` through a view of `base` whose blocks are compiled, shapes static
    at first (torch.compile's automatic dynamic shapes mark what changes): the decode step's
    model under ``{"regional": True}`` (`DecodeSlots`), run eagerly around the blocks and
    captured in its CUDA graph with them, so what lies outside the blocks costs nothing at
    replay. Why: the whole step's compile and capture took 129 s for a 1B base on an H100
    (`bench.probe.decode_step`, this file's module docs for the dynamic forwards)."""
    run = _regional(_whole_call, options, dynamic=None)
    return lambda **inputs: run(base, inputs)


def _whole_call(base, inputs: dict[str, Any]):
    return base(**inputs)


def _regional(forward: Forward, options: dict, dynamic: bool | None = True) -> Forward:
    """`forward` on a view of the base whose blocks are compiled (one view per base, made on
    first use), under dynamo's recompile limit for a block-compiled model (a block indexes the
    cache by its layer number, a constant to the compiler: `regions.recompile_limit`)."""
    from torch._dynamo import config as dynamo_config

    from .. import regions

    options = _compile_options(options, dynamic)
    views: dict[int, tuple[Any, Any]] = {}  # id(base) -> (base, its view): the base kept alive with its id

    def run(base, inputs: dict[str, Any]):
        kept = views.get(id(base))
        if kept is None:
            kept = views[id(base)] = (base, regions.view(base, compile=True, compile_options=options))
        limit = max(dynamo_config.recompile_limit, regions.recompile_limit(base))
        with fx_config.patch(use_duck_shape=False), dynamo_config.patch(recompile_limit=limit):
            return forward(kept[1], inputs)

    return run


__all__ = ["CompiledForward", "regional_call"]
