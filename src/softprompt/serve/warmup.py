"""Warm-up: compile the base model's forwards, and capture the decode step's graph, before
the first request waits for them (with compiling on a GPU: 30-60 s per compiled version for
a 1B model on an H100, minutes in all). A few short requests run through each shape of
batch that compiles a version of its own (`compiled.py`): one row and two rows, for a task
whose rows start with a key/value prefix (a deep prompt or a cached leading segment) and one
whose rows start with none; for head requests also two tasks' prefixes in one batch (one
task's is a shared view, several tasks' are gathered per row). On a GPU those joins are short:
they go through the prefill graphs (`graphed.py`), whose compiled versions (one row, more
rows) are the ones every short join replays; each other bucket is captured on its first
join (a few eager prefills' time, no compile). Joins beyond the graphs' token budget run
the unpadded forward, compiled on the first such join.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from ..architecture import ModelKind, model_spec
from .entry import BankEntry
from .decode import Decoder
from .decode_row import DecodeRow
from .engine import Engine
from .request import Request
from .sampling import Sampling

log = logging.getLogger("softprompt.serve")


# tasks registered but not in memory (`PromptBank.register`) the warm-up reads at most, in
# search of a kind of prefix the tasks in memory lack: 10,000 lazily served tasks are not all
# read at start-up for it
WARM_READS = 16


def first_of_each_kind(entries: Iterable[BankEntry]) -> list[BankEntry]:
    """The first entry whose rows start with a prefix and the first whose rows do not."""
    picked: dict[bool, BankEntry] = {}
    for entry in entries:
        picked.setdefault(entry.deep, entry)
        if len(picked) == 2:
            break
    return list(picked.values())


def candidates(bank) -> Iterator[BankEntry]:
    """The bank's entries to warm up with: those in memory, then at most `WARM_READS` read."""
    names, loaded = bank.names(), set(bank.loaded())
    yield from (bank[n] for n in names if n in loaded)
    yield from (bank[n] for n in [n for n in names if n not in loaded][:WARM_READS])


def warm_text(words: int) -> str:
    return " ".join(["warm"] * words)


def warm_decoder(decoder: Decoder) -> list[str]:
    """Joins of one and of two rows (of different lengths) and their decode steps, for each
    prefix kind of the bank's generating tasks. Returns the tasks it ran."""
    bank = decoder.bank
    entries = first_of_each_kind(e for e in candidates(bank) if e.task is None or e.task.generates)
    for entry in entries:
        fields = entry.model.template.fields or ("text",)
        for n in (1, 2):
            decoder.run([DecodeRow(entry.name, {f: warm_text(3 + 2 * i) for f in fields}, Sampling(max_new_tokens=2),
                                   entry=entry) for i in range(n)])
    return [e.name for e in entries]


def warm_heads(engine: Engine) -> list[str]:
    """Head batches of one and of two rows for each prefix kind, and two tasks' prefixed rows
    in one batch, through the engine (not counted in its metrics). Returns the tasks it ran."""
    bank = engine.bank
    heads = [e for e in candidates(bank) if e.task is not None and not e.task.generates]
    batches = [[e] * n for e in first_of_each_kind(heads) for n in (1, 2)]
    deep = [e for e in heads if e.deep][:2]
    if len(deep) == 2:
        batches.append(deep)
    kept, ran = len(engine.batches), []
    for entries in batches:
        requests = [Request(e.name, _input(e, 3 + 2 * i)) for i, e in enumerate(entries)]
        for result in engine.run(requests):
            if not result.ok:
                log.warning("warming up %s: %s", result.task, result.error)
        ran += [e.name for e in entries if e.name not in ran]
    del engine.batches[kept:]  # the metrics count requests served, not these
    return ran


def warm_up(engine: Engine) -> list[str]:
    """Everything the engine would compile or capture on its first requests: head batches
    where its head forward is compiled, then the decoder's joins and steps (causal LMs;
    encoder-decoders' `generate()` is not compiled). Returns the tasks it ran."""
    ran = warm_heads(engine) if engine.heads.forward.compiled else []
    if model_spec(engine.bank.base).kind is ModelKind.CAUSAL:
        ran += [name for name in warm_decoder(engine.decoder) if name not in ran]
    return ran


def _input(entry: BankEntry, words: int):
    """A request's input: the text alone for a template of one field (as a client sends it:
    a word field takes it split), else each field's."""
    fields = entry.model.template.fields
    return warm_text(words) if len(fields) == 1 else {f: warm_text(words) for f in fields}


__all__ = ["first_of_each_kind", "warm_decoder", "warm_heads", "warm_up"]
