"""The prefill: one forward of the base model over the rows that join the running batch,
each with its task's prompt, giving their first tokens' scores and the keys and values
the decode slots take over.

Joins vary in rows and length, so the prefill cannot replay one CUDA graph as the decode
step does. Compiled (`Prefill(compile=...)`), it runs through `torch.compile` with dynamic
shapes (`compiled.py`): four versions serve joins of any size (one row or more, a cache
that starts with a prefix or empty), with the norms, rotary embedding and activations
fused instead of run one kernel at a time; `warmup.warm_decoder` compiles them before a server
takes requests. Short joins, bound by launches rather than by the GPU, are replayed from
CUDA graphs of padded shapes instead (`graphed.PrefillGraphs`), where the decoder uses graphs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


from .. import inject
from .bank import PromptBank
from .compiled import CompiledForward
from .graphed import Joined, PrefillGraphs
from .mixed import MixedBatch, collate_mixed, encode_mixed


class Prefill:
    """The joining rows' forward for a bank's tasks (a causal LM base).

    Args:
        bank: the tasks.
        compile: run the forward through `torch.compile` with dynamic shapes; a dict:
            `torch.compile`'s keyword arguments. A compiled forward that fails falls back
            to the uncompiled one (`forward`).
        graphs: the joins that `graphs.takes` run through it (short joins, padded and
            replayed from CUDA graphs); the others run the forward as above.
    """

    def __init__(self, bank: PromptBank, compile: bool | dict = False, graphs: PrefillGraphs | None = None):
        self.bank = bank
        self.base = bank.base
        self.graphs = graphs
        self._forward = CompiledForward(prefill_forward, compile, "prefill")
        if graphs is not None:  # graphs record this forward (compiled where asked)
            graphs.forward = self._forward

    @property
    def compiled(self) -> bool:
        return self._forward.compiled

    def __call__(self, rows: Sequence) -> Joined:
        """The rows' forward (`DecodeRow`s): their first scores, keys and values (deep
        prefix, prompt, text; left-padded), attention mask and next positions (`Joined`)."""
        batch = self.batch(rows)
        if self.graphs is not None and self.graphs.takes(batch):
            return self.graphs(batch)
        out, inputs = self.forward(self.inputs_of(batch))
        cache, mask = inject.output_cache(out), inputs["attention_mask"]
        return Joined(scores=out.logits[:, -1], keys=[layer.keys for layer in cache.layers],
                      values=[layer.values for layer in cache.layers], mask=mask,
                      positions=inputs["position_ids"][:, -1] + 1, entries=list(batch.entries),
                      prefix_length=mask.shape[1] - batch["input_ids"].shape[1])

    def batch(self, rows: Sequence) -> MixedBatch:
        """The rows collated (left-padded) by their tasks' encoders."""
        # by pinned entry where the row has one: a task removed or replaced while its row
        # waited to join changes nothing for it; a row with a name only is looked up once
        entries = self.bank.entries(r.entry if r.entry is not None else r.task for r in rows)
        if all(r.encoded is not None for r in rows):
            return collate_mixed(self.bank, entries, [r.encoded for r in rows], padding_side="left")
        return encode_mixed(self.bank, entries, [r.example for r in rows], padding_side="left")

    def inputs(self, rows: Sequence) -> Callable[[], dict[str, Any]]:
        """`inputs_of` the rows' batch."""
        return self.inputs_of(self.batch(rows))

    def inputs_of(self, batch: MixedBatch) -> Callable[[], dict[str, Any]]:
        """A builder of the base model's inputs for `batch` with its prompts
        (`inject.base_inputs`), called again for a fresh cache."""
        model = batch.entries[0].model
        return lambda: inject.base_inputs(self.base, model.spec, batch["input_ids"], batch["attention_mask"],
                                          batch["prompt_index"], self.bank.prompts_for(batch.entries), keep_cache=True,
                                          logits_to_keep=1 if model.keeps_logits else None)

    def forward(self, inputs_of: Callable[[], dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        """The forward (compiled where asked; `CompiledForward.run`: inputs built afresh
        for an uncompiled rerun) and its inputs (`inputs_of`)."""
        def call(forward):
            inputs = inputs_of()
            return forward(self.base, inputs), inputs

        return self._forward.run(call)


def prefill_forward(base, inputs: dict[str, Any]):
    """The base model's forward over joining rows (`inject.base_inputs`): its own code
    object, so its compiled versions are counted apart from every other compile of the model."""
    return base(**inputs)


__all__ = ["Prefill", "prefill_forward"]
