"""Batches of head requests (classification, tagging, a verbalizer's answer slot) on the
bank's base model: collated and their forward queued (`HeadForwards.launch`: replayed from
a head graph without waiting for the device where one takes the batch, else run eagerly or
compiled), then each task group's predictions read from it (`HeadForwards.read`). The
engine queues a batch's forward before it reads the answers of the batch before
(`Engine._run_head_batches`), so the GPU works while the host reads and collates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..architecture import ModelKind, model_spec
from ..encode import EncodedRow
from ..errors import ConfigError
from .bank import PromptBank
from .entry import BankEntry
from .compiled import CompiledForward
from .graphed import HeadGraphs, Launched, paddable
from .mixed import MixedBatch, collate_mixed, forward_mixed, head_forward, output_rows


@dataclass
class Pending:
    """A batch of head requests collated, its forward queued (`launched`, from the head
    graphs) or done (`out`)."""

    encoded: MixedBatch
    out: Any = None
    launched: Launched | None = None


class HeadForwards:
    """The head forward of a bank's tasks, compiled where asked, and its CUDA graphs.

    Args:
        compile: compile the forward (`compiled.CompiledForward`; a dict: `torch.compile`'s
            keyword arguments).
        graphs: pad batches to buckets and replay them from CUDA graphs (`HeadGraphs`; on
            a CPU the padded forward runs eagerly); None: on a CUDA device for a causal LM
            whose rows may be padded (`graphed.paddable`).

    Raises:
        ConfigError: graphs asked for on a base whose rows cannot be padded.
    """

    def __init__(self, bank: PromptBank, *, compile: bool | dict = False, graphs: bool | None = None):
        self.bank = bank
        self.forward = CompiledForward(head_forward, compile, "head forward")
        self.graphs = self._graphed(graphs)

    def _graphed(self, wanted: bool | None) -> HeadGraphs | None:
        base = self.bank.base
        cuda = base.get_input_embeddings().weight.is_cuda
        can = model_spec(base).kind is ModelKind.CAUSAL and paddable(base)
        if wanted is None:
            wanted = cuda and can
        elif wanted and not can:
            raise ConfigError(f"{base.config.model_type}: head batches cannot be padded to buckets (not a causal LM, "
                              "a sliding window, or positions that do not follow the attention mask)")
        if not wanted:
            return None
        graphs = HeadGraphs(self.bank, capture=cuda)
        graphs.forward = self.forward  # the graphs record the head forward (compiled where asked)
        return graphs

    def launch(self, entries: Sequence[BankEntry], rows: Sequence[EncodedRow]) -> Pending:
        """The rows collated (row b encoded by task entry b, the entry it was checked with:
        see `PromptBank.entry`) and their forward queued."""
        encoded = collate_mixed(self.bank, entries, rows)
        tasks = [e.task for e in {id(e): e for e in entries}.values()]
        reads = {"output_hidden_states": any(t.reads.get("output_hidden_states") for t in tasks),
                 "logits": "answer" if any(t.reads.get("logits") == "answer" for t in tasks) else "none"}
        if self.graphs is not None and self.graphs.takes(encoded, **reads):
            return Pending(encoded, launched=self.graphs.launch(encoded, **reads))
        out = self.forward.run(lambda fn: forward_mixed(self.bank, encoded, base_forward=fn, **reads))
        return Pending(encoded, out=out)

    def read(self, pending: Pending, entries: Sequence[BankEntry], examples: Sequence[Any]) -> list[Any]:
        """Each row's prediction from the launched forward, by its task's head, one read of
        the device per task group."""
        encoded = pending.encoded
        out = pending.out if pending.launched is None else self.graphs.finish(encoded, pending.launched)
        predictions: list[Any] = [None] * len(entries)
        for key, entry in {id(e): e for e in entries}.items():
            mine = [i for i, e in enumerate(entries) if id(e) == key]
            sub = encoded.rows(mine)
            entry.task.annotate(sub, [examples[i] for i in mine])
            for i, p in zip(mine, entry.task.predict(entry.model, sub, output_rows(out, mine))):
                predictions[i] = p
        return predictions


__all__ = ["HeadForwards", "Pending"]
