"""Short prefills replayed from CUDA graphs, one graph per bucket of rows and length.

Why: a join of a few short rows is bound by launches, not by the GPU. On an H100 a 1B
Llama's prefill of one 64-token row is ~3 ms of kernels but ~15 ms of wall time eager
(`bench.probe.prefill`): hundreds of kernels, each launched from Python through every
module of the model. The decode step has the same problem and replays one graph
(`slots.py`); a join's shape changes from one join to the next, so the prefill keeps a
graph per shape instead, and pads each join to the nearest bucket of rows (1, 2, 4, ...)
and of length (every 16 tokens to 128, every 32 to 256, every 64 to 512): a few dozen
graphs serve the short joins a server sees, each captured on its first use (~3 eager
prefills' time).
Dynamic-shape compiling (`compiled.py`) was measured on the same join: 13.3 ms, and a
minute of compiling per version.

How a join is padded, so that each real row computes exactly what it computes alone:
  * length: more pad tokens on the left (attention mask 0), as the collation pads rows
    shorter than the longest; the pad columns are dropped from the keys and values the
    join hands over, so the slots hold the same columns as after an eager prefill;
  * rows: copies of the first row, whose outputs are dropped;
  * the attention mask goes in as a 4-D additive causal mask (`inject.causal_additive_mask`):
    transformers turns a 2-D mask into one by reading its values on the host, which a
    capture forbids.

Inputs are copied into the graph's fixed input tensors, the graph is replayed, and what the
join needs is copied out of its outputs at once: every graph draws on one memory pool, so
the next replay of any of them may overwrite them. Joins larger than `max_tokens` padded
tokens are bound by the GPU and run as before (eagerly, or compiled).

The forward captured is the prefill's own (`Prefill`): compiled with dynamic shapes where
the decoder compiles, so a graph replays the fused kernels of one compiled version for
every bucket (compiled while the first join of each version is captured). A capture that
fails (a family whose forward cannot be captured) turns the graphs off for the decoder with
one warning; the join then runs as before.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .. import forward, inject
from ..architecture import model_spec
from ..inject import Prompts
from .bank import PromptBank
from .compiled import CompiledForward
from .mixed import MixedBatch
from .slots import sliding_window

log = logging.getLogger("softprompt.serve")

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LENGTH_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# the inputs a graph takes, in its key's order; the prompt tensors may be absent (None)
INPUTS = ("input_ids", "attention_mask", "prompt_index", "tables", "prefix", "prefix_mask", "input_delta")


def bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `n` (None: beyond the largest)."""
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


@dataclass
class Joined:
    """What a prefill hands the decoder, for its n real rows (the eager prefill's shapes).

    Attributes:
        scores: (n, V) next-token scores at each row's last column.
        keys, values: per layer (n, H_kv, K, D_head), K = P + S columns (prefix, row).
        mask: (n, K) 1 where a row attends.
        positions: (n,) each row's next position.
        entries: each row's bank entry (as the batch ran it: `BankEntry.for_row`).
        prefix_length: P, the leading columns that hold deep prefixes or cached segments
            (a row with a shorter one has it padded in front).
    """

    scores: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    positions: torch.Tensor
    entries: list = field(default_factory=list)
    prefix_length: int = 0

    def prefixes(self) -> list[tuple[Any, int]]:
        """Each row's (entry, its prefix length): what `DecodeSlots.place` puts in the pool."""
        return [(e, e.num_virtual_tokens if e.deep else 0) for e in self.entries]

    @property
    def layers(self) -> list["Joined.Layer"]:
        """The keys and values as a cache's layers (what `DecodeSlots.place` reads)."""
        return [Joined.Layer(k, v) for k, v in zip(self.keys, self.values)]

    @dataclass
    class Layer:
        keys: torch.Tensor
        values: torch.Tensor


@dataclass
class Launched:
    """A head batch's forward queued on the device (`HeadGraphs.launch`).

    Attributes:
        outputs: the padded forward's outputs ("answer": (rows, V), "hidden": (rows, width,
            D), each None where not read), the batch's own copies.
        width: the padded length.
        done: recorded on the graphs' stream after the outputs were copied (None: no stream,
            the outputs are ready).
    """

    outputs: dict[str, torch.Tensor | None]
    width: int
    done: torch.cuda.Event | None = None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    inputs: dict[str, torch.Tensor | None]  # the fixed tensors the graph reads
    outputs: dict[str, Any]  # the tensors its replay writes


class PaddedGraphs:
    """Forwards over a bank's tasks (a causal LM with full attention in every layer, left-
    padded rows), padded to buckets and replayed from CUDA graphs (see the module
    docstring). Subclasses give the forward (`_body`) and what is cut back out of it.

    Args:
        bank: the tasks.
        max_tokens: most padded tokens (rows x length) a graphed batch holds; larger ones
            are left to the caller (`takes` is False).
        capture: record graphs (CUDA); False runs the same padded forward eagerly, the
            path the CPU tests check row by row against rows run alone.
        max_graphs: most graphs kept (each distinct mix of prompt lengths in a batch is a
            shape of its own); a batch of a new shape beyond them runs padded, eagerly.
    """

    what = "forward"  # its name in the warning of a failed capture

    def __init__(self, bank: PromptBank, *, max_tokens: int = 8192, capture: bool = True, max_graphs: int = 256):
        self.bank = bank
        self.base = bank.base
        self.max_tokens = max_tokens
        self.capture = capture
        self.max_graphs = max_graphs
        self.forward: CompiledForward | None = None  # the base's forward (compiled where asked); None: base(**inputs)
        self.enabled = True
        self._stream: torch.cuda.Stream | None = None  # where head batches are replayed (`HeadGraphs.launch`)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def shape(self, rows: int, length: int) -> tuple[int, int] | None:
        """The bucket (rows, length) a batch of `rows` rows of `length` tokens pads to;
        None when it takes none (graphs off, beyond the buckets or `max_tokens`)."""
        if not self.enabled:
            return None
        padded = bucket(rows, ROW_BUCKETS), bucket(length, LENGTH_BUCKETS)
        if None in padded or padded[0] * padded[1] > self.max_tokens:
            return None
        return padded

    # -- graphs ---------------------------------------------------------------------
    def _replay(self, values: dict[str, torch.Tensor | None], variant: tuple = ()) -> dict[str, Any]:
        """The padded forward's outputs: replayed from the graph of the inputs' shapes and
        `variant` (what the body computes beyond them; `_body`), recorded on first use."""
        if not self.capture:
            return self._body(values, variant)
        key = tuple(None if values[k] is None else (k, tuple(values[k].shape), values[k].dtype) for k in INPUTS)
        key += variant
        graph = self._graphs.get(key)
        if graph is None and len(self._graphs) >= self.max_graphs:
            return self._body(values, variant)
        if graph is None:
            try:
                graph = self._graphs[key] = self._record(values, variant)
            except Exception as e:  # a forward that cannot be captured: batches run as before from now on
                torch.cuda.synchronize(values["input_ids"].device)
                log.warning("%s not captured as CUDA graphs (%s: %s); it runs without them from now on",
                            self.what, type(e).__name__, e)
                self.enabled = False
                self._graphs.clear()
                return self._body(values, variant)
        for k, fixed in graph.inputs.items():
            if fixed is not None:
                fixed.copy_(values[k])
        graph.graph.replay()
        return graph.outputs

    def _record(self, values: dict[str, torch.Tensor | None], variant: tuple) -> _Graph:
        """Capture the forward on fixed copies of `values` (two runs first, on a side stream,
        so that kernels pick their algorithms and workspaces are allocated)."""
        inputs = {k: None if v is None else v.clone() for k, v in values.items()}
        device = self.base.get_input_embeddings().weight.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(inputs, variant)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self._body(inputs, variant)
        return _Graph(graph, inputs, outputs)

    def _body(self, values: dict[str, torch.Tensor | None], variant: tuple) -> dict[str, Any]:
        """The padded batch's forward: what a graph records (the subclass's)."""
        raise NotImplementedError

    def _run(self, values: dict[str, torch.Tensor | None], *, output_hidden_states: bool = False,
             **options) -> tuple[Any, dict[str, Any]]:
        """The base's output over the padded rows and the inputs it was given
        (`inject.base_inputs` with the 4-D additive mask; `options` its keywords)."""
        prompts = _prompts_of(values)
        model = self._model

        def call(fn):  # inputs built afresh for each call: a failed compiled run may have half-filled a cache
            inputs = inject.base_inputs(self.base, model.spec, values["input_ids"], values["attention_mask"],
                                        values["prompt_index"], prompts, additive_mask=True, **options)
            if output_hidden_states:
                inputs["output_hidden_states"] = True
            return fn(self.base, inputs), inputs

        return self.forward.run(call) if self.forward is not None else call(lambda base, kw: base(**kw))

    def _padded(self, batch: MixedBatch) -> tuple[dict[str, torch.Tensor | None], Prompts, int, int]:
        """The batch padded to its bucket with its entries' prompts: (values, prompts, rows, width)."""
        n, S = batch["input_ids"].shape
        rows, width = self.shape(n, S)
        entries = list(batch.entries) + [batch.entries[0]] * (rows - n)
        padded = _pad(batch, rows, width, entries[0].model.encoder.pad_id)
        prompts = self.bank.prompts_for(entries)
        self._model = entries[0].model  # spec and LM-head options: the base's, the same for every task
        # a DePT row's delta counts its real tokens, which the left pads added here do not move
        return dict(padded, **_prompt_values(prompts)), prompts, rows, width


class PrefillGraphs(PaddedGraphs):
    """The joins of rows into the decoder (`Prefill`): each join's first scores, keys and
    values, mask and next positions (`Joined`), cut back to its real rows and columns."""

    what = "prefill"

    def takes(self, batch: MixedBatch) -> bool:
        return self.shape(*batch["input_ids"].shape) is not None

    @torch.no_grad()
    def __call__(self, batch: MixedBatch) -> Joined:
        """The join's prefill (`takes(batch)` must hold): padded, replayed (or run), cut back."""
        n, S = batch["input_ids"].shape
        values, prompts, rows, width = self._padded(batch)
        outputs = self._replay(values)
        P = prompts.prefix_length
        keep = torch.cat([torch.arange(P), torch.arange(P + width - S, P + width)]).to(outputs["mask"].device)
        return Joined(scores=outputs["scores"][:n].clone(),
                      keys=[k[:n].index_select(2, keep) for k in outputs["keys"]],
                      values=[v[:n].index_select(2, keep) for v in outputs["values"]],
                      mask=outputs["mask"][:n].index_select(1, keep), positions=outputs["positions"][:n].clone(),
                      entries=list(batch.entries), prefix_length=P)

    def _body(self, values: dict[str, torch.Tensor | None], variant: tuple = ()) -> dict[str, Any]:
        """The padded join's forward: scores at each row's last column, the cache, the full
        mask and the next positions (what a graph records)."""
        out, inputs = self._run(values, keep_cache=True, logits_to_keep=1 if self._model.keeps_logits else None)
        cache = inject.output_cache(out)
        prompts = _prompts_of(values)
        return {"scores": out.logits[:, -1], "keys": [layer.keys for layer in cache.layers],
                "values": [layer.values for layer in cache.layers], "mask": prompts.full_mask(values["attention_mask"]),
                "positions": inputs["position_ids"][:, -1] + 1}



class HeadGraphs(PaddedGraphs):
    """Batches of head requests (`Engine`: classification, tagging, a verbalizer's answer
    slot): what `forward_mixed` gives them, cut back to their real rows and columns.

    Graphed where every row ends at the column its head reads (left-padded rows; an
    answer slot, if read, at each row's last column, as templates ending in ``[MASK]``
    give on a causal LM): the LM head is then applied at that one column, the same in
    every bucket. Batches reading all logits, or answers elsewhere, run as before.
    """

    what = "head forward"

    def takes(self, batch: MixedBatch, *, logits: str = "none", output_hidden_states: bool = False) -> bool:
        S = batch["input_ids"].shape[1]
        if self.shape(batch["input_ids"].shape[0], S) is None or logits not in ("none", "answer"):
            return False
        model = batch.entries[0].model
        if model.padding_side != "left":
            return False
        if logits == "answer":  # known on the host where the batch was collated (no wait for the device)
            # a row without an answer slot (-1: a classifier beside a verbalizer) reads none:
            # it gets the last column's scores here, column 0's in the eager forward
            return model.keeps_logits and batch.get("answer_index") is not None and batch.answers_at_last_column()
        return True

    @torch.no_grad()
    def __call__(self, batch: MixedBatch, *, logits: str = "none",
                 output_hidden_states: bool = False) -> forward.SoftPromptOutput:
        """The batch's head forward (`takes` must hold): padded, replayed (or run), cut back."""
        return self.finish(batch, self.launch(batch, logits=logits, output_hidden_states=output_hidden_states))

    @torch.no_grad()
    def launch(self, batch: MixedBatch, *, logits: str = "none", output_hidden_states: bool = False) -> "Launched":
        """Queue the batch's forward (`takes` must hold) without waiting for the device: on
        a GPU the graph is replayed on the graphs' own stream, so that the answers of the
        batch before, read on the current stream (`finish`), do not wait for this one."""
        values, _, rows, width = self._padded(batch)  # on the current stream, as the batch's inputs came
        variant = (logits == "answer", output_hidden_states)
        if not self.capture:
            return Launched(self._replay(values, variant), width)
        current = torch.cuda.current_stream(values["input_ids"].device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(values["input_ids"].device)
        self._stream.wait_stream(current)
        for v in values.values():  # made on the current stream, read on the graphs' own
            if v is not None:
                v.record_stream(self._stream)
        with torch.cuda.stream(self._stream):
            outputs = self._replay(values, variant)
            # the next replay overwrites the graph's outputs: what the heads read is copied out
            outputs = {k: None if v is None else v.clone() for k, v in outputs.items()}
            done = torch.cuda.Event()
            done.record(self._stream)
        return Launched(outputs, width, done)

    def finish(self, batch: MixedBatch, launched: "Launched") -> forward.SoftPromptOutput:
        """The launched forward's outputs as the eager forward gives them, cut back to the
        batch's real rows and columns, for the current stream to read."""
        n, S = batch["input_ids"].shape
        outputs = launched.outputs
        if launched.done is not None:
            current = torch.cuda.current_stream(batch["input_ids"].device)
            current.wait_event(launched.done)
            for v in outputs.values():  # made on the graphs' stream, read (and freed) on this one
                if v is not None:
                    v.record_stream(current)
        hidden, answer = outputs["hidden"], outputs["answer"]
        return forward.over_real_tokens(
            batch["attention_mask"], batch["prompt_index"],
            hidden=None if hidden is None else hidden[:n, launched.width - S :],
            answer_logits=None if answer is None else answer[:n],
            field_index=batch.get("field_index"), word_index=batch.get("word_index"))

    def _body(self, values: dict[str, torch.Tensor | None], variant: tuple) -> dict[str, Any]:
        """The padded batch's forward: the answer slot's scores (the last column) and the
        last layer's states, each where read (`variant`)."""
        answer, hidden = variant
        options: dict[str, Any] = {"logits_to_keep": 1} if self._model.keeps_logits else {}
        out, _ = self._run(values, output_hidden_states=hidden, **options)
        states = None
        if hidden:
            states = getattr(out, "last_hidden_state", None)
            states = out.hidden_states[-1] if states is None else states
        return {"answer": out.logits[:, -1] if answer else None, "hidden": states}

def _prompt_values(prompts: Prompts) -> dict[str, torch.Tensor | None]:
    """The prompt tensors a padded forward reads, by their names in `INPUTS`."""
    return dict(tables=prompts.tables, prefix=prompts.prefix, prefix_mask=prompts.prefix_mask,
                input_delta=prompts.input_delta)


def _prompts_of(values: dict[str, torch.Tensor | None]) -> Prompts:
    """The `Prompts` of a padded forward's values (the graph's fixed copies when replayed)."""
    return Prompts(**{k: values[k] for k in ("tables", "prefix", "prefix_mask", "input_delta")})


def _pad(batch: MixedBatch, rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch's input ids, attention mask and prompt index (n, S) padded to (rows,
    width): pad tokens on the left of every row, then copies of the first row."""
    out = {}
    for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("prompt_index", -1)):
        x = batch[name]
        n, S = x.shape
        x = torch.cat([x.new_full((n, width - S), fill), x], dim=1)
        out[name] = torch.cat([x, x[:1].expand(rows - n, -1)]) if rows > n else x
    return out


def paddable(base) -> bool:
    """Whether joins on `base` may be padded to buckets (`PrefillGraphs`): every
    layer attends to the whole cache (the 4-D mask it builds has no window), and positions
    come from the attention mask (more pads on the left move no token)."""
    return sliding_window(base.config)[0] is None and model_spec(base).accepts_position_ids


__all__ = ["HeadGraphs", "Joined", "Launched", "PaddedGraphs", "PrefillGraphs", "bucket", "paddable"]
