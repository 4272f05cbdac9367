"""A task of the prompt bank: its name, its entry, and how an entry is made.

An entry holds what a batch needs of one task: its `SoftPromptModel` on the shared base
(the template encoder, the spec), its head if the folder had one, and its collapsed prompt
in host memory (with the cached K/V of its leading segment, `prompt_cache.py`). The
bank (`bank.py`) decides which entries are in memory and on the device; the per-batch
stacks (`stacks.py`) read their tensors. `PlainBase` makes the base model alone an entry
like any other: a template ``{text}`` and no prompt.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..architecture import ModelKind, OnBase, model_spec
from ..encode import EncodedRow, TemplateEncoder
from ..errors import ConfigError, EncodingError, SoftPromptError
from ..folder import has_task, load_with_task, unreadable_as
from ..io.prompt import read_config
from ..model import SoftPromptModel
from ..tasks import Task
from ..template import parse_template
from .prompt_cache import CachedLead, cacheable, compute_lead, starts_after_lead

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class UnknownTaskError(SoftPromptError, KeyError):
    """A request names a task the bank does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_task_name(name: str) -> str:
    """Task names become folder names and URL parts: letters, digits, ``_ . -``, not
    starting with a dot (no hidden files, no path traversal), at most 64 characters."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"invalid task name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


class PlainBase(OnBase):
    """The frozen base with no prompt: what the bank reads off a task's `SoftPromptModel`
    (encoder, template, spec, prompt size), for the entry that serves the base model alone.

    Its template is ``{text}``: a row is the tokenizer's own special tokens around the text,
    as the base model reads it with no template (completions and chat fill the one field).
    """

    TEMPLATE = "{text}"
    deep = False
    num_virtual_tokens = 0

    def __init__(self, base, tokenizer):
        self.base = base
        self.tokenizer = tokenizer
        self.spec = model_spec(base)
        if self.spec.kind is ModelKind.ENCODER:
            raise ConfigError(f"{type(base).__name__} is an encoder-only model: it generates no text, so the base "
                              "alone has nothing to answer under its own name (serve it through tasks with heads)")
        self.template = parse_template(self.TEMPLATE)
        self.encoder = TemplateEncoder(self.template, tokenizer, self.spec)

    def eval(self) -> "PlainBase":
        return self

    def export(self) -> torch.Tensor:
        """No prompt: a (0, D) table."""
        return torch.zeros(0, self.base.get_input_embeddings().weight.shape[-1])


@dataclass
class BankEntry:
    """One task in the bank.

    Attributes:
        name: the task name requests use (the base model's name for the base entry).
        model: the task's `SoftPromptModel` on the shared base (collapsed prompt), or the
            `PlainBase` of the entry that serves the base alone.
        task: its head (classification, NER, ...) when the folder had one, bound to `model`.
        tensor: the collapsed prompt in host memory, fp32: (P, D) or (L, 2, H_kv, P, D_head).
        metadata: what the folder recorded (training run, metrics, ...).
        input_delta: a DePT prompt's additive input delta in host memory, fp32 (S_max, D);
            None for every other method (and the base alone).
    """

    name: str
    model: SoftPromptModel
    task: Task | None
    tensor: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    lead: CachedLead | None = None
    on_device: torch.Tensor | None = None
    input_delta: torch.Tensor | None = None
    delta_on_device: torch.Tensor | None = None
    _uncached: "BankEntry | None" = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """``base`` (the base model alone, no prompt), ``deep`` or ``input``."""
        if isinstance(self.model, PlainBase):
            return "base"
        return "deep" if self.deep else "input"

    @property
    def method(self) -> str | None:
        """The prompt's method (None for the base alone)."""
        return None if self.kind == "base" else self.model.config.method

    @property
    def template(self) -> str | None:
        """The task's template (None for the base alone: its rows are the text as it is)."""
        return None if self.kind == "base" else self.model.template.source

    @property
    def prompted(self) -> bool:
        """Whether the entry's rows take anything from the bank (a table or a prefix)."""
        return self.deep or self.num_virtual_tokens > 0

    @property
    def deep(self) -> bool:
        """The task's rows take a key/value prefix: a deep prompt, or a cached leading segment."""
        return self.model.deep or self.lead is not None

    @property
    def num_virtual_tokens(self) -> int:
        """Positions of the prompt in a batch: the deep prefix's, the cached segment's, or
        the input prompt's virtual slots."""
        return self.lead.length if self.lead is not None else self.model.num_virtual_tokens

    @property
    def served(self) -> torch.Tensor:
        """What a batch uses: the cached segment's keys and values, or the collapsed prompt."""
        return self.lead.kv if self.lead is not None else self.tensor

    def for_row(self, row: EncodedRow) -> "BankEntry":
        """The entry a row runs with: this one, or, for a row that cannot start after the
        cached lead (`prompt_cache.starts_after_lead`: an empty field), the same task
        without it, whose rows run whole with the prompt table. That one is made once per
        entry, so its device copy is kept between requests."""
        if self.lead is None or starts_after_lead(row, self.lead.length):
            return self
        if self._uncached is None:
            self._uncached = dataclasses.replace(self, lead=None, on_device=None, delta_on_device=None)
        return self._uncached


def load_folder(folder: Path, base, tokenizer) -> tuple[SoftPromptModel, Task | None, dict[str, Any]]:
    """A saved prompt folder's model, task head (if saved) and metadata.

    A folder is the admin's input: whatever the loaders fail with on one they cannot read
    (a task.json without a key it needs, a head of the wrong shape) is a PromptFileError
    naming the folder, so that a PUT answers 422 and not 500."""
    with unreadable_as(folder, "cannot be loaded as a prompt folder"):
        if has_task(folder):
            model, task = load_with_task(folder, base, tokenizer)
        else:
            model, task = SoftPromptModel.from_pretrained(base, folder, tokenizer=tokenizer).eval(), None
        return model, task, read_config(folder).get("metadata") or {}


def _check_room(name: str, model: SoftPromptModel) -> None:
    """Refuse a prompt whose template alone (virtual tokens, fixed text, special tokens)
    fills the model's positions: loaded, it would fail every request sent to it."""
    try:
        model.encoder.encode({f: "x" for f in model.template.fields})
    except EncodingError as e:
        raise ConfigError(f"task {name!r}: {str(e).removeprefix('example: ')}") from None


def build_entry(name: str, model: SoftPromptModel, task: Task | None, metadata: dict[str, Any], *,
                cache_prompts: bool) -> BankEntry:
    """The entry of a task's model (read from its folder, or given): checked to leave room
    for its fields, put in eval mode, its prompt exported to host memory and, with
    `cache_prompts`, its leading segment's keys and values computed once (`prompt_cache`)."""
    _check_room(name, model)
    model.eval()  # serving: no dropout in the base, the prompt or the head
    if task is not None:
        task.eval()
    delta = model.export_input_delta()
    entry = BankEntry(name, model, task, model.export().cpu(), metadata,
                      input_delta=None if delta is None else delta.cpu())
    n = cacheable(model, task) if cache_prompts else 0
    if n:
        lead = compute_lead(model, n)
        entry.lead = CachedLead(lead.length, lead.kv.cpu())
    return entry


__all__ = ["BankEntry", "PlainBase", "UnknownTaskError", "build_entry", "check_task_name", "load_folder"]
