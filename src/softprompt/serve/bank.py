"""The prompt bank: many tasks' prompts on one frozen base model.

Each task is a saved prompt folder (``save_pretrained`` / ``softprompt train`` output: the
collapsed tensor, its template, and optionally its task head) loaded onto the shared base
as a `SoftPromptModel` whose prompt is the collapsed tensor. What a batch needs is built
per batch from the tasks in it (`prompts_for`): input tables and deep key/value prefixes
are stacked row by row, padded to the longest prompt, with a mask over the prefix.

Three levels hold a task, each least recently used first out: the accelerator (at most
``max_on_device`` tasks keep their tensor there; the others move over when a batch needs
them), host memory (at most ``max_in_memory`` tasks loaded from folders; the others are
dropped and read again from their folder on their next request), and the folder itself.
A folder may be registered without being read (`register`, `from_directory(lazy=True)`):
10,000 tasks then start in the time of listing them, and each is read on its first
request, or ahead of it (`prefetch`, which the server calls when a request arrives).

The base model itself is served under its own name too (`PromptBank.add_base`): an entry
whose model is a `PlainBase`, a template ``{text}`` with no prompt at all. Its rows are
input rows with zero virtual tokens: they flow through the same encoding, collation,
`prompts_for` and decode as every task's (a row of the base in a mixed batch reads no
table and masks every prefix position), so nothing downstream knows it apart.

What a task's entry holds, and how one is made, is `entry.py`; how a batch's rows gather
their tasks' device tensors into one `Prompts` is `stacks.py`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import ConfigError, SoftPromptError
from ..folder import has_task, prompt_directory, prompt_info
from ..inject import Prompts
from ..io.hub import resolve_prompt_source
from ..io.atomic import read_json_object
from ..io.prompt import TASK_FILE, read_config
from ..io.remote import is_url, read_remote_config, subfolders
from ..model import SoftPromptModel
from ..tasks import Task
from .entry import BankEntry, PlainBase, UnknownTaskError, build_entry, check_task_name, load_folder
from .stacks import POSITIONS_FROM_CACHE, stack_prompts


def named_prompt_folders(pairs: list[str], prompts: Path | str | None) -> dict[str, Path | str]:
    """``--prompt NAME=PATH`` options as {name: local folder, or URL}, checked before the
    model loads: a valid task name, no name given twice or also a sub-folder of a local
    --prompts, and a PATH that exists, a Hub location ``user/repo[@revision][:subdir]``
    (fetched here, into the Hub cache: a missing repository is refused before the model
    loads too) or an fsspec URL (copied into the cache here, kept as the task's source)."""
    named: dict[str, Path | str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--prompt {pair!r}: expected NAME=PATH (a task name and its prompt folder or Hub id)")
        check_task_name(name)
        if name in named:
            raise ConfigError(f"--prompt {pair!r}: task {name!r} is given twice")
        if isinstance(prompts, Path) and (prompts / name).is_dir():
            raise ConfigError(f"--prompt {pair!r}: task {name!r} is also a sub-folder of --prompts {prompts}")
        try:
            folder = resolve_prompt_source(path)
        except SoftPromptError as e:
            raise ConfigError(f"--prompt {pair!r}: {e}") from None
        if not folder.exists():
            raise ConfigError(f"--prompt {pair!r}: {path} does not exist")
        named[name] = path if is_url(path) else folder
    return named



class PromptBank:
    """Soft prompts of many tasks on one frozen base model.

    Args:
        base: the shared frozen model (moved nowhere: put it on its device first).
        tokenizer: its tokenizer.
        max_on_device: most tasks whose tensors stay on the base model's device (None:
            all); the least recently used go back to host memory.
        cache_prompts: compute the keys and values of a task's leading virtual tokens (and
            fixed text) once, and start its rows after them (causal LMs; `prompt_cache.py`).

    Example:
        >>> bank = PromptBank.from_directory(base, tok, "prompts/")   # prompts/<task>/...
        >>> bank.add("sentiment", "runs/sst2/prompt")                 # while serving
        >>> prompts = bank.prompts_for(["sentiment", "ner", "sentiment"])   # per-row Prompts
    """

    def __init__(self, base, tokenizer, *, max_on_device: int | None = None, max_in_memory: int | None = None,
                 cache_prompts: bool = True):
        for key, value in (("max_on_device", max_on_device), ("max_in_memory", max_in_memory)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")
        self.base = base
        self.tokenizer = tokenizer
        self.max_on_device = max_on_device
        self.max_in_memory = max_in_memory
        self.cache_prompts = cache_prompts
        self._entries: OrderedDict[str, BankEntry] = OrderedDict()  # loaded, in least-recently-used order
        # with max_on_device: the entries whose tensor is on the device, least recently used first
        self._resident: OrderedDict[int, BankEntry] = OrderedDict()
        self._folders: dict[str, Path | str] = {}  # tasks added from a folder (or URL): where they are (re)read from
        self._loading: dict[str, threading.Lock] = {}  # one read of a task's folder at a time
        self._prefetcher: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self.base_name: str | None = None  # the name the base model alone answers to (`add_base`)
        self.reads = 0  # prompt folders read (loads and reloads), for tests and metrics

    # -- loading --------------------------------------------------------------
    @classmethod
    def from_directory(cls, base, tokenizer, directory: str | Path, *, lazy: bool = False,
                       **kwargs) -> "PromptBank":
        """A bank of every prompt folder under `directory` (one sub-folder per task, named
        after the task; a run directory's ``prompt/`` folder is found too), a local folder
        or an fsspec URL (``s3://bucket/prompts``: `io.remote`); `lazy`: each registered
        (`register`), read on its first request.

        Raises:
            ConfigError: `directory` is missing or holds no prompt folder.
            PromptFileError / BaseModelMismatchError: a folder is unreadable or was saved
                for another base model (the message names the folder).
        """
        if is_url(directory):  # a prompt store at an fsspec URL: s3://bucket/prompts, ...
            tasks: list[tuple[str, str | Path]] = list(subfolders(directory))
        else:
            directory = Path(directory)
            if not directory.is_dir():
                raise ConfigError(f"prompt directory {directory} does not exist")
            tasks = [(p.name, p) for p in sorted(directory.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        bank = cls(base, tokenizer, **kwargs)
        for name, sub in tasks:
            if lazy:
                bank.register(name, sub)
            else:
                bank.add(name, sub)
        if not len(bank):
            raise ConfigError(f"{directory} holds no prompt folders (one sub-folder per task, each written by "
                              "save_pretrained or softprompt train)")
        return bank

    def add(self, name: str, source: str | Path | SoftPromptModel, *, task: Task | None = None,
            replace: bool = False) -> BankEntry:
        """Load a task: a saved prompt folder (or run directory), or a `SoftPromptModel` on
        this bank's base model.

        Raises:
            ConfigError: an invalid name, a name already taken (without `replace`), or a
                model on another base.
        """
        check_task_name(name)
        self.refuse_base_name(name, "loaded as a task")
        folder = None if isinstance(source, SoftPromptModel) else prompt_directory(source)
        entry = self._build(name, source if folder is None else folder, task)
        if is_url(source):  # read again from the URL: a prompt changed there is copied afresh
            folder = source
        with self._lock:
            if name in self and not replace:
                raise ConfigError(f"task {name!r} is already loaded; remove it first or replace it")
            self._unload(name)
            self._folders.pop(name, None)
            if folder is not None:
                self._folders[name] = folder
            self._entries[name] = entry
            self._evict_from_memory(entry)
        return entry

    def register(self, name: str, folder: str | Path, *, replace: bool = False) -> None:
        """Make a task of a prompt folder without reading it: its ``prompt_config.json``
        is checked now, the rest is read on its first request (or `prefetch`).

        Raises:
            ConfigError: an invalid name, or one taken (without `replace`).
            PromptFileError: not a prompt folder (the message names the file).
        """
        check_task_name(name)
        self.refuse_base_name(name, "loaded as a task")
        if is_url(folder):  # only its prompt_config.json is read now (`io.remote`)
            read_remote_config(folder)
        else:
            folder = prompt_directory(folder)
            read_config(folder)  # not a prompt folder: refused now, not at its first request
        with self._lock:
            if name in self and not replace:
                raise ConfigError(f"task {name!r} is already loaded; remove it first or replace it")
            self._unload(name)
            self._folders[name] = folder

    def _build(self, name: str, source: Path | str | SoftPromptModel, task: Task | None) -> BankEntry:
        """The task's entry: its folder read (or its model taken), checked, prompt K/V cached."""
        metadata: dict[str, Any] = {}
        if isinstance(source, SoftPromptModel):
            if source.base is not self.base:
                raise ConfigError(f"task {name!r}: its SoftPromptModel is built on another base model")
            model = source
            if task is not None:
                task.bind(model)
        else:
            if is_url(source):  # copied into the cache, or found there unchanged (`io.remote`)
                source = prompt_directory(source)
            model, task, metadata = load_folder(source, self.base, self.tokenizer)
            self.reads += 1
        return build_entry(name, model, task, metadata, cache_prompts=self.cache_prompts)

    def _load(self, name: str) -> BankEntry:
        """A registered task's entry, its folder read if it is not in memory. Reads run
        outside the bank's lock (batches of other tasks go on meanwhile), one per task at a
        time (a second request for it waits for the first read)."""
        with self._lock:
            folder = self._folders.get(name)
            if folder is None:
                raise self._unknown(name)
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None:
                    return entry
                if self._folders.get(name) != folder:  # removed or replaced while this waited
                    return self[name]
            entry = self._build(name, folder, None)
            with self._lock:
                if self._folders.get(name) != folder:
                    return self[name]
                self._entries[name] = entry
                self._evict_from_memory(entry)
            return entry

    def _unload(self, name: str) -> None:
        """Take a task's entry out of memory (under the lock), its device copy with it once
        the last batch that holds the entry is done."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._resident.pop(id(entry), None)

    def _evict_from_memory(self, keep: BankEntry) -> None:
        """Drop the least recently used tasks read from folders beyond `max_in_memory`
        (they are read again on their next request); tasks given as models stay."""
        if self.max_in_memory is None:
            return
        loaded = [n for n, e in self._entries.items() if n in self._folders]
        for name in loaded[: max(0, len(loaded) - self.max_in_memory)]:
            if self._entries[name] is not keep:
                self._unload(name)

    def prefetch(self, names: Iterable[str]) -> None:
        """Read registered tasks not in memory in the background, ahead of their requests
        (a failure is left to the request's own lookup, which reads the folder again and
        reports it)."""
        with self._lock:
            todo = list(dict.fromkeys(n for n in names if isinstance(n, str) and n in self._folders
                                      and n not in self._entries))
            if todo and self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="softprompt-prefetch")
        for name in todo:
            self._prefetcher.submit(self._quietly, name)

    def _quietly(self, name: str) -> None:
        try:
            self[name]
        except Exception:  # noqa: BLE001 - the request's own lookup raises it
            pass

    def in_memory(self, name: str) -> bool:
        """Whether a lookup of `name` reads no folder (loaded, or not a task at all)."""
        return name in self._entries or name not in self._folders

    def loaded(self) -> list[str]:
        """The tasks in host memory now (the base alone included, if served)."""
        return list(self._entries)

    def add_base(self, name: str) -> BankEntry:
        """Serve the base model alone, with no prompt, under `name` (next to the tasks:
        completions and chat; it has no head). Its rows share batches and decode slots with
        the tasks' rows (`PlainBase`).

        Raises:
            ConfigError: an invalid name, one a task (or the base) holds already, or an
                encoder-only base (it generates nothing).
        """
        check_task_name(name)
        plain = PlainBase(self.base, self.tokenizer)
        entry = BankEntry(name, plain, None, plain.export())
        with self._lock:
            if self.base_name is not None:
                raise ConfigError(f"the base model is served already, as {self.base_name!r}")
            if name in self._entries:
                raise ConfigError(f"{name!r} is a loaded task's name: the base model needs another name to be served "
                                  "under (softprompt serve --base-name), or rename the task's folder")
            self._entries[name] = entry
            self.base_name = name
        return entry

    def refuse_base_name(self, name: str, what: str) -> None:
        """Refuse to treat the base model's name as a task's: the base is not a prompt.

        Raises:
            ConfigError: `name` is the base's; the message ends "cannot be <what>"."""
        if name == self.base_name:
            raise ConfigError(f"{name!r} is the base model's name (it is served alone, with no prompt): it cannot be "
                              f"{what}; use another task name, or give the base another (softprompt serve --base-name)")

    def remove(self, name: str) -> None:
        self.refuse_base_name(name, "removed")
        with self._lock:
            if name not in self:
                raise self._unknown(name)
            self._unload(name)
            self._folders.pop(name, None)

    @cached_property
    def vocabulary_size(self) -> int:
        """Columns of the base model's next-token scores (a `logit_bias` token must be one);
        read once: every completion checks its token ids against it, and the base's head
        does not change under a bank."""
        head = self.base.get_output_embeddings()
        return head.weight.shape[0] if head is not None else self.base.config.vocab_size

    # -- lookup ---------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._folders

    def __len__(self) -> int:
        return len(self._entries.keys() | self._folders.keys())

    def names(self) -> list[str]:
        """Every task (and the base alone, if served), in memory or not."""
        return sorted(self._entries.keys() | self._folders.keys())

    def __getitem__(self, name: str) -> BankEntry:
        """The task's entry, read from its folder if it is not in memory (`register`)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                if name in self._folders:
                    self._entries.move_to_end(name)  # recently used: the last to leave host memory
                return entry
        return self._load(name)

    def describe(self, name: str) -> dict[str, Any]:
        """What `/v1/models` lists of a task, without reading a folder not in memory: the
        prompt as `softprompt info` describes its folder (method, kind ``input`` / ``deep``,
        or ``base`` for the base alone, virtual tokens, template) and its head's kind. An
        input prompt served from a cached K/V segment is still ``input``."""
        with self._lock:
            entry, folder = self._entries.get(name), self._folders.get(name)
        if entry is not None:
            kind = entry.kind if entry.kind == "base" else ("deep" if entry.model.deep else "input")
            return {"method": entry.method, "kind": kind, "num_virtual_tokens": entry.model.num_virtual_tokens,
                    "template": entry.template, "task": entry.task.kind if entry.task is not None else None}
        if folder is None:
            raise self._unknown(name)
        if is_url(folder):  # its two JSON files read, not its tensors
            config, task = read_remote_config(folder)
            return {"method": config["method"], "kind": config.get("kind"),
                    "num_virtual_tokens": config.get("num_virtual_tokens"), "template": config.get("template"),
                    "task": task.get("kind") if task else None}
        info = prompt_info(folder)
        head = read_json_object(folder / TASK_FILE).get("kind") if has_task(folder) else None
        return {"method": info["method"], "kind": info["kind"], "num_virtual_tokens": info["num_virtual_tokens"],
                "template": info["template"], "task": head}

    def entry(self, task: str | BankEntry) -> BankEntry:
        """A task name's entry now, or an entry itself (pinned).

        The engine pins each request to the entry it was checked against and passes the
        entries, not the names, down to the batch: an admin may remove or replace a task
        between the check and the forward (or while the row waits to join a decode), and
        a lookup by name then would fail the whole batch, other tasks' rows included
        (found by the load test, tests/robustness/test_server_load.py), or run a row
        encoded for one prompt with another's tensor.
        """
        return task if isinstance(task, BankEntry) else self[task]

    def _unknown(self, name: str) -> UnknownTaskError:
        return UnknownTaskError(f"unknown task {name!r}; loaded tasks: {', '.join(self.names()) or '(none)'}")

    def on_device(self) -> list[str]:
        """The tasks whose tensors are on the accelerator now."""
        return [n for n, e in self._entries.items() if e.on_device is not None]

    # -- per-batch prompts ----------------------------------------------------
    def _device_tensor(self, entry: BankEntry, device: torch.device) -> torch.Tensor:
        """The entry's tensor on `device`, marking it most recently used and evicting the
        least recently used beyond `max_on_device` (their host copies stay)."""
        if self._entries.get(entry.name) is entry:  # a pinned entry may have been removed or replaced since
            self._entries.move_to_end(entry.name)
        if entry.on_device is None or entry.on_device.device != device:
            entry.on_device = entry.served.to(device, non_blocking=True)
        if entry.input_delta is not None and (entry.delta_on_device is None or entry.delta_on_device.device != device):
            entry.delta_on_device = entry.input_delta.to(device, non_blocking=True)
        if self.max_on_device is not None:  # O(1) a row: a scan of every task here cost 2,000-task runs 27%
            self._resident[id(entry)] = entry
            self._resident.move_to_end(id(entry))
            while len(self._resident) > self.max_on_device:
                _, old = self._resident.popitem(last=False)
                old.on_device = old.delta_on_device = None
        return entry.on_device

    def prompts_for(self, names: Sequence[str | BankEntry]) -> Prompts:
        """The `Prompts` of a batch whose row b uses task ``names[b]`` (a name, or a pinned
        entry: see `entry`): each task's tensor on the device (`_device_tensor`), stacked
        and gathered per row (`stacks.stack_prompts`: input tables (B, P_in, D), deep
        prefixes (L, 2, B, H_kv, P_deep, D_head) with a (B, P_deep) mask, input deltas
        (B, S_max, D)).
        """
        if not names:
            raise ConfigError("a batch needs at least one row")
        device = self.base.get_input_embeddings().weight.device
        with self._lock:
            entries = [self.entry(n) for n in names]
            # keyed by entry, not name: a batch may hold rows of a task and of its replacement
            tensors = {id(e): self._device_tensor(e, device) for e in entries if e.prompted}
            deltas = {id(e): e.delta_on_device for e in entries if e.input_delta is not None}
        return stack_prompts(entries, tensors, deltas, device)

    def prompt_length(self, name: str | BankEntry) -> int:
        """The deep prefix length a task's rows take in a batch (0 for input prompts): what
        batches of `POSITIONS_FROM_CACHE` families must agree on."""
        entry = self.entry(name)
        return entry.num_virtual_tokens if entry.deep else 0

    def entries(self, names: Iterable[str | BankEntry]) -> list[BankEntry]:
        return [self.entry(n) for n in names]


__all__ = ["PromptBank", "BankEntry", "PlainBase", "UnknownTaskError", "check_task_name", "named_prompt_folders",
           "POSITIONS_FROM_CACHE"]
