"""Prompt K/V caching: a task whose template begins with its virtual tokens (and any fixed
text before the first field) starts every row with the same tokens; on a causal LM their
keys and values are the same for every request. They are computed once per task and used
as a key/value prefix, like a deep prompt: each row then runs only from its first field on.

    [P:100] Review: {text} Sentiment: [MASK]
    '-------------------' computed once per task -> (L, 2, H_kv, n, D_head)

A row with the cached prefix equals the row recomputed: the prefix's keys and values are
those the full row computes at positions 0..n-1 (a causal LM's early positions never see
later ones), and the row's own tokens take positions n, n+1, ... as they would.
Outputs exist only for the row's own tokens, so a task that reads the states of fixed text
in that leading segment (a classification head pooling every token) is not cached when the
segment holds real tokens; tasks that read the answer slot or generate always are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .. import inject
from ..architecture import ModelKind
from ..encode import EncodedRow
from ..template import Mask, Placeholder, Virtual

log = logging.getLogger("softprompt.serve")


@dataclass
class CachedLead:
    """A task's cached leading segment.

    Attributes:
        length: n, the row positions the prefix stands for (specials, virtual slots, text).
        kv: (L, 2, H_kv, n, D_head) their keys and values, in the base model's dtype.
    """

    length: int
    kv: torch.Tensor


def lead_length(model) -> int:
    """How many leading positions of every row of `model` are the same for every example
    and hold all its virtual slots (0: the template does not start that way)."""
    if model.deep or model.spec.kind is not ModelKind.CAUSAL or model.encoder is None:
        return 0
    if model.prompt.input_delta() is not None:
        return 0  # DePT: the row's real tokens are counted from its start (`inject.add_input_delta`), lead included
    items = model.encoder.items
    first = next((i for i, it in enumerate(items) if isinstance(it, (Placeholder, Mask))), len(items))
    if not any(isinstance(it, Virtual) for it in items[:first]) or any(isinstance(it, Virtual) for it in items[first:]):
        return 0
    probe = model.encoder.encode({name: "x" for name in model.template.fields})
    starts = [i for i, f in enumerate(probe.field_index) if f >= 0]
    if probe.answer_index >= 0:
        starts.append(probe.answer_index)  # the token whose output answers [MASK] stays in the row
    return min(starts) if starts else 0


def cacheable(model, task) -> int:
    """The lead length to cache for a task (0: none)."""
    n = lead_length(model)
    if not n:
        return 0
    if task is None or task.answer_only:  # completions only, or no outputs of the leading tokens read
        return n
    probe = model.encoder.encode({name: "x" for name in model.template.fields})
    real = [i for i in range(n) if probe.prompt_index[i] < 0]
    return 0 if real else n  # the head reads every real token's state: only virtual slots may go


@torch.no_grad()
def compute_lead(model, n: int) -> CachedLead:
    """Run the base model once on the first n positions of a row with the task's prompt.

    On a base split by tensor parallelism this is a collective (the forward, then every
    process's K/V heads gathered: the lead is whole, as a deep prompt is, and split where
    it is used, `inject.local_kv_heads`): every process must run it at the same point
    (`LockstepLeads`)."""
    probe = model.encoder.encode({name: "x" for name in model.template.fields})
    ids = torch.tensor([probe.input_ids[:n]], device=model.device)  # (1, n)
    prompt_index = torch.tensor([probe.prompt_index[:n]], device=model.device)
    out = model.base(**inject.base_inputs(model.base, model.spec, ids, torch.ones_like(ids), prompt_index,
                                          model.prompts(), keep_cache=True,
                                          logits_to_keep=1 if model.keeps_logits else None))  # only the cache is wanted
    layers = inject.output_cache(out).layers
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # (L, 2, H_kv / N, n, D_head)
    return CachedLead(n, inject.whole_kv_heads(kv, model.base))  # (L, 2, H_kv, n, D_head)


class LockstepLeads:
    """The cached leads of a server whose base is split by tensor parallelism, computed only
    at points every process reaches together.

    There `compute_lead` is a collective forward. A bank that ran it when it reads a task
    (`PromptBank(cache_prompts=True)`) would run it on rank 0 when a request is submitted
    and on the others when their run reaches the task: the forwards would not line up. So
    the banks read tasks without a lead, and at each message of the lockstep
    (`serve/lockstep.py`) rank 0 names the tasks whose lead its requests need and nobody
    holds yet (`missing`, sent with the message); every process computes those, in that
    order, and hands each request's entry its task's lead (`attach`).

    Kept by task name, not on the entries: each process's bank drops and reads entries at
    moments of its own (rank 0 at submission), while this store changes only at messages,
    in the same way on every process (a task's folder does not change under tensor
    parallelism: no admin API).

    Args:
        max_tasks: most leads kept (None: all), the least recently used dropped first
            (computed again on the task's next request).
    """

    def __init__(self, max_tasks: int | None = None):
        self.max_tasks = max_tasks
        self._leads: OrderedDict[str, CachedLead] = OrderedDict()
        self.computed = 0  # leads computed (a task's again after it was dropped included), for tests

    def missing(self, entries: Iterable) -> list[str]:
        """Rank 0: the tasks of `entries` (bank entries) whose lead is to be computed now."""
        names = [e.name for e in _distinct(entries) if e.lead is None and e.name not in self._leads
                 and cacheable(e.model, e.task)]
        return list(dict.fromkeys(names))

    def attach(self, entries: Iterable, computed: list[str],
               agree: Callable[[list[bool]], list[bool]] | None = None) -> None:
        """Every process: compute the leads of the tasks `computed` names (rank 0's
        `missing`, in its order) from their entries here, then hand each of `entries` its
        task's lead (its device copy, if any, was the prompt table: dropped). A lead that
        fails to compute is logged and left out: that task's rows run whole, as they would
        without a cache. `agree` (``Channel.any``: a collective, called by every process
        when `computed` is not empty) makes a lead that failed on any process left out on
        all of them: rows run whole on one process and from the lead on another would run
        different forwards, and the processes would wait for each other in a collective.

        Raises:
            RuntimeError: this process holds no entry of a task rank 0 computes, or no lead
                for an entry that takes one: it is out of step with rank 0.
        """
        entries = _distinct(entries)
        by_name = {e.name: e for e in entries}
        failed = set()
        for name in computed:
            if name not in by_name:
                raise RuntimeError(f"out of step with rank 0: no entry of task {name!r} to compute its lead")
            entry = by_name[name]
            try:
                lead = compute_lead(entry.model, cacheable(entry.model, entry.task))
            except Exception:
                log.exception("the cached leading segment of task %r could not be computed; its rows run whole", name)
                failed.add(name)
                continue
            self._leads[name] = CachedLead(lead.length, lead.kv.cpu())
            self.computed += 1
        if computed and agree is not None:
            elsewhere = {n for n, f in zip(computed, agree([n in failed for n in computed])) if f} - failed
            for name in elsewhere:
                log.error("the cached leading segment of task %r failed on another process; its rows run whole "
                          "here too", name)
                del self._leads[name]
                self.computed -= 1
            failed |= elsewhere
        for entry in entries:
            if entry.lead is None and entry.name not in failed and cacheable(entry.model, entry.task):
                if entry.name not in self._leads:
                    raise RuntimeError(f"out of step with rank 0: no lead for task {entry.name!r}")
                entry.lead, entry.on_device = self._leads[entry.name], None
            if entry.name in self._leads:
                self._leads.move_to_end(entry.name)
        while self.max_tasks is not None and len(self._leads) > self.max_tasks:
            self._leads.popitem(last=False)


def _distinct(entries: Iterable) -> list:
    """Entries, each once (by identity: a dataclass's equality compares tensors)."""
    return list({id(e): e for e in entries}.values())


def starts_after_lead(row: EncodedRow, n: int) -> bool:
    """Whether a row keeps what it needs once its first n positions are the cached lead: a
    token of its own (a causal LM reads its last one) and its answer slot. The lead is
    measured with text in every field; an empty field can move both into it (the row
    "[P:4] {text}[MASK]" with text "" is its 4 virtual tokens, answered at the last)."""
    return len(row.input_ids) > n and (row.answer_index < 0 or row.answer_index >= n)


def strip_lead(row: EncodedRow, n: int) -> EncodedRow:
    """The row without its first n positions (they are in the cached prefix)."""
    return dataclasses.replace(
        row, input_ids=row.input_ids[n:], prompt_index=row.prompt_index[n:], field_index=row.field_index[n:],
        word_index=row.word_index[n:], answer_index=row.answer_index - n if row.answer_index >= 0 else -1)


__all__ = ["CachedLead", "LockstepLeads", "lead_length", "cacheable", "compute_lead", "strip_lead"]
