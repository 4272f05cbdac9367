"""Training throughput and memory: softprompt against HF PEFT and against the frozen model's floor.

    python -m bench.train.throughput --out bench/results/train_throughput.json          # on a GPU
    python -m bench.train.throughput --models tiny --shapes 2x32 --steps 2 --out /tmp/t.json   # CPU smoke run

Every row is one training step, measured in one process on one randomly initialised model
of a real shape (speed does not depend on the weights), bf16 weights, 20 virtual tokens:

  floor   the frozen model's forward + backward to its input embeddings (no weight
          gradients) over the same B x (S + 20) positions, with the same loss: what any
          soft-prompt method must at least spend.
  ours    softprompt's training step as `softprompt train` runs it: the task's loss through
          `SoftPromptModel`, backward, one read of the loss (the NaN check), gradient
          clipping at 1.0, fused AdamW; ``eager`` and ``compile`` (train.compile: the
          base's blocks compiled); ``checkpointing`` rows with train.gradient_checkpointing;
          the LM loss from the states by the kernel ``train.lm_loss=auto`` picks
          (liger-kernel's fused linear cross-entropy where installed on a GPU, else
          softprompt's chunks; each row records its ``lm_loss``), but in these rows:
          ``whole-logits``: eager, the LM loss over the whole (B, S, V) logits (before the
          chunked loss, `loss.chunked_token_loss`); ``chunks`` / ``liger`` / ``cce``:
          eager, the LM loss's summed cross-entropy from the states
          (`loss.summed_token_loss`) by softprompt's chunks, liger-kernel's fused linear
          cross-entropy or cut-cross-entropy's `linear_cross_entropy`; ``liger-own-chunks``:
          liger with its own chunk sizes (``chunk_mem_const=1``: chunks the states' size)
          instead of softprompt's budget for a frozen head (`loss.liger_chunk_budget`).
  peft    HF PEFT 0.21 with the same method and sizes (prompt encoder sizes set to PEFT's
          defaults on both sides), the same clipping and fused AdamW, no host reads; with
          and without bf16 autocast (Trainer's ``bf16=True``), the faster one is the baseline.

Losses: ``lm`` (next-token cross-entropy over every position) and ``cls`` (a verbalizer:
the label words' log-probabilities at one answer slot, the last position; the LM head
only there, for PEFT too via ``logits_to_keep=1``).
tokens/s counts the B x S real tokens of a step for every side.

Length mixes (``--mix``): ``fixed`` (every row S tokens, the rows above) or rows of real
lengths (`steps.MIXES`: ``sst2``, GLUE SST-2's train rows, mean 12 tokens; ``instruct``,
20-1,000 tokens), at most S each, left-padded to the longest row of the batch. The
``packed`` / ``packed-compile`` variants run the same rows padding-free (``train.packing``:
the rows packed into sequences of at most ``--pack-tokens`` tokens, `softprompt.packing`);
the floor's ``packed`` row runs the frozen model on the same packed layout. With a mix,
tokens/s counts the rows' real tokens (``real_tokens``; ``padded_tokens`` beside it).

    python -m bench.train.throughput --models tiny --shapes 8x64 --mix sst2 --sides floor,ours \
        --methods prompt_tuning,p_tuning_v2 --variants eager,packed --steps 2 --repeats 1 --out /tmp/p.json  # CPU
    python -m bench.train.throughput --models gpt2-124m,llama-1b --shapes 32x64 --mix sst2 \
        --variants eager,compile,packed,packed-compile --out bench/results/train_throughput_packed.json  # GPU

``--attention`` is the base's attn_implementation, recorded in every row: ``sdpa`` (the
default; a packed sequence then carries a 4-D boolean mask, so attention runs the masked
kernels over every pair of a sequence of up to ``--pack-tokens``) or ``flex_attention``
(a packed sequence's mask is a `BlockMask`, `softprompt.packing.segment_mask`: blocks no
segment reads are skipped; its backward runs on GPUs only). Issue 24's comparison, on a GPU,
both runs into one report (the rows differ by ``attention``):

    for a in sdpa flex_attention; do python -m bench.train.throughput --models llama-1b --shapes 8x1024 \
        --mix instruct --losses lm --sides floor,ours --methods prompt_tuning,p_tuning_v2 --variants eager,packed \
        --attention $a --steps 5 --repeats 2 --out bench/results/train_packed_instruct_attention_h100.json; done
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any, Callable

import torch

from bench.harness.hardware import peak_tflops
from bench.harness.report import RESULTS, versions, write_json
from bench.harness.shapes import tokenizer
from bench.harness.steps import (DEEP, METHODS, MIXES, P, TrainBase, floor_step, our_config, our_step, peft_config,
                                 peft_step, row_lengths, text_ids)
from bench.harness.timing import measure
from softprompt.training.fast_path import resolved_lm_loss

KEY = ("model", "batch", "seq", "mix", "loss", "side", "method", "variant", "autocast", "attention")
#: rows written before rows named their attention implementation were all measured under SDPA
KEY_DEFAULTS = {"attention": "sdpa"}
PACKED = ("packed", "packed-compile")
FLOAT8 = ("float8", "float8-compile")  # train.float8: the blocks' frozen linears in FP8


def row_key(row: dict[str, Any]) -> tuple:
    """What makes a row the same measurement as another (`KEY`)."""
    return tuple(row.get(k, KEY_DEFAULTS.get(k)) for k in KEY)


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - one failing row is reported, the rest still run
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the grid ---------------------------------------------------------------------------
class ModelRun:
    """Every row of one model: the shapes x losses x sides x methods x variants asked for,
    each row merged into `report` (a row measured again replaces its earlier value) and
    written to `out` as soon as it is measured."""

    def __init__(self, name: str, args, tok, report: dict, out: Path):
        from softprompt import regions

        self.name, self.args, self.tok, self.report, self.out = name, args, tok, report, out
        self.lengths: list[int] | None = None  # the row lengths of the shape being measured (--mix)
        setup = TrainBase.build(name, tok, args.attention)
        self.device, self.base, self.hidden, self.words = setup.device, setup.base, setup.hidden, setup.words
        self.auto_lm_loss: str | None = None  # train.lm_loss=auto's kernel for this base: resolved (and logged) once
        self.N = sum(p.numel() for p in self.base.parameters())
        self.views = {"eager": self.base}
        if "compile" in args.variants or "packed-compile" in args.variants:
            self.views["compile"] = regions.view(self.base, compile=True)
        if "graphs" in args.variants:
            self.views["graphs"] = regions.view(self.base, compile=True, compile_options={"mode": "reduce-overhead"})
        for variant in FLOAT8:  # the frozen model's blocks in FP8 (train.float8): the floor of ours' FP8 rows
            if variant in args.variants:
                self.views[variant] = regions.view(self.base, float8=True, compile=variant == "float8-compile")
        torch._dynamo.config.recompile_limit = 8 * regions.recompile_limit(self.base)  # every variant in one process
        self.peak = peak_tflops(torch.cuda.get_device_name(0)) if self.device == "cuda" else None

    def timed(self, step: Callable[[], None]) -> dict[str, Any]:
        args = self.args
        return measure(step, warmup=args.warmup, calls=args.steps, windows=args.repeats).step_row()

    def record(self, row: dict[str, Any]) -> None:
        B, S = row["batch"], row["seq"]
        tokens = row.get("real_tokens", B * S)
        if "ms_per_step" in row:
            row["tokens_per_s"] = round(tokens / (row["ms_per_step"] / 1e3), 1)
            if self.peak:
                row["pct_peak_4N"] = round(100 * row["tokens_per_s"] * 4 * self.N / (self.peak * 1e12), 2)
        row.update(model=self.name, params=self.N)
        key = row_key(row)
        self.report["rows"] = [r for r in self.report["rows"] if row_key(r) != key] + [row]
        print({k: row.get(k) for k in ("model", "batch", "seq", "loss", "attention", "side", "method", "variant", "tokens_per_s",
                                       "peak_gib", "error")}, flush=True)
        write_json(self.report, self.out)

    def run(self) -> None:
        args = self.args
        for shape in args.shapes:
            B, S = (int(x) for x in shape.split("x"))
            ids = text_ids(B, S, self.tok.vocab_size, self.device)
            self.lengths = row_lengths(args.mix, B, S)
            mixed = {}
            if self.lengths is not None:
                mixed = dict(real_tokens=sum(self.lengths), padded_tokens=B * max(self.lengths))
            for loss_kind in args.losses:
                key = dict(batch=B, seq=S, mix=args.mix, loss=loss_kind, attention=args.attention, **mixed)
                if "floor" in args.sides:
                    floors = [v for v in args.variants if v in self.views or (v == "packed" and self.lengths)]
                    for variant in floors:
                        self.record({**key, "side": "floor", "method": None, "variant": variant,
                                     **guarded(lambda: self.floor(variant, loss_kind, ids))})
                for method in args.methods:
                    if "ours" in args.sides:
                        for variant in [v for v in args.variants if v not in PACKED or self.lengths]:
                            self.record({**key, "side": "ours", "method": method, "variant": variant,
                                         **guarded(lambda: self.ours(method, variant, loss_kind, ids))})
                    if "peft" in args.sides:
                        for autocast in args.peft_autocast:
                            self.record({**key, "side": "peft", "method": method, "variant": "eager",
                                         "autocast": autocast,
                                         **guarded(lambda: self.peft(method, loss_kind, ids, autocast))})
                            if method in DEEP or "checkpointing" not in args.variants:
                                continue
                            self.record({**key, "side": "peft", "method": method, "variant": "checkpointing",
                                         "autocast": autocast, **guarded(
                                             lambda: self.peft(method, loss_kind, ids, autocast, checkpointing=True))})
        self.views.clear()  # the compiled views (and their CUDA-graph pools) go before the next model

    def floor(self, variant: str, loss_kind: str, ids: torch.Tensor) -> dict[str, Any]:
        packed = self.args.pack_tokens if variant == "packed" else None
        return self.timed(floor_step(self.views.get(variant, self.base), loss_kind, ids, self.words,
                                     variant == "graphs", self.lengths, packed))

    def ours(self, method: str, variant: str, loss_kind: str, ids: torch.Tensor) -> dict[str, Any]:
        import softprompt as sp
        from softprompt.tasks import Verbalizer

        model = sp.SoftPromptModel(self.base, our_config(method, self.hidden), tokenizer=self.tok)
        task = Verbalizer({"positive": " great", "negative": " terrible"})
        task.bind(model)
        options = {"mode": "reduce-overhead"} if variant == "graphs" else None
        packed = self.args.pack_tokens if variant in PACKED else None
        # the LM loss's kernel as `softprompt train` picks it (train.lm_loss=auto), but in the
        # rows that compare the kernels
        if self.auto_lm_loss is None:
            self.auto_lm_loss = resolved_lm_loss("auto", self.base, self.base.device)
        lm_loss = {"liger": "liger", "liger-own-chunks": "liger", "chunks": "chunks", "cce": "chunks"}.get(variant) \
            or self.auto_lm_loss
        with model.accelerated(compile=variant in ("compile", "graphs", "packed-compile", "float8-compile"),
                               compile_options=options, checkpointing=variant == "checkpointing", lm_loss=lm_loss,
                               float8=variant in FLOAT8), loss_kernel(variant):
            model.train()
            result = self.timed(our_step(model, task, loss_kind, ids, self.tok, variant == "graphs",
                                         whole_logits=variant == "whole-logits", lengths=self.lengths,
                                         pack_tokens=packed))
        result["trainable"], result["lm_loss"] = model.trainable_parameters(), lm_loss
        return result

    def peft(self, method: str, loss_kind: str, ids: torch.Tensor, autocast: bool,
             checkpointing: bool = False) -> dict[str, Any]:
        from peft import get_peft_model

        peft_model = get_peft_model(self.base, peft_config(method))
        if checkpointing:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            peft_model.train()
            result = self.timed(peft_step(peft_model, loss_kind, ids, self.words, autocast, self.lengths))
            if not checkpointing:
                result["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            return result
        finally:
            if checkpointing:
                self.base.gradient_checkpointing_disable()
            self.base.requires_grad_(False)


def loss_kernel(variant: str):
    """For the ``cce`` rows: `loss.summed_token_loss` replaced by cut-cross-entropy's fused
    LM head + cross-entropy for the step (the LM head of the benchmark's Llama is a plain
    linear layer, so both compute the same sum); for ``liger-own-chunks``, liger's chunks
    sized by liger (`loss.liger_chunk_budget` 1); else nothing (the ``liger`` rows run
    softprompt's own ``lm_loss="liger"``)."""
    from contextlib import nullcontext
    from unittest import mock

    from softprompt import loss

    if variant == "liger-own-chunks":  # liger sizes its chunks as for a head that trains
        return mock.patch.object(loss, "liger_chunk_budget", lambda positions, vocab, hidden: 1)
    if variant != "cce":
        return nullcontext()
    from cut_cross_entropy import linear_cross_entropy

    kernel = lambda base, states, wanted, _kernel: linear_cross_entropy(  # noqa: E731
        states, base.get_output_embeddings().weight, wanted, reduction="sum")
    return mock.patch.object(loss, "summed_token_loss", kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-124m,llama-1b,llama-8b")
    parser.add_argument("--shapes", default="8x256,16x512", help="BxS, comma-separated")
    parser.add_argument("--losses", default="lm,cls")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sides", default="floor,ours,peft")
    parser.add_argument("--variants", default="eager,compile,graphs",
                        help="eager, compile (train.compile=true), graphs (train.compile=reduce-overhead), checkpointing, "
                             "whole-logits (eager, the LM loss over the whole logits), chunks / liger / cce (eager, the LM loss by "
                             "softprompt's chunks / liger-kernel / cut-cross-entropy), liger-own-chunks (liger's chunk "
                             "sizes), packed / packed-compile (with --mix: the rows padding-free, train.packing), float8 / float8-compile (train.float8: the blocks' frozen "
                             "linear layers in FP8; the floor's rows too)")
    parser.add_argument("--mix", default="fixed", choices=["fixed", *MIXES],
                        help="row lengths: fixed (S each) or a real length mix (at most S each)")
    parser.add_argument("--pack-tokens", type=int, default=512, help="train.pack_tokens of the packed variants")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flex_attention"],
                        help="the base's attn_implementation (recorded in each row)")
    parser.add_argument("--peft-autocast", default="off,on")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed windows of --steps steps; the median is kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    args = parser.parse_args()
    for name in ("models", "shapes", "losses", "methods", "sides", "variants"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    args.peft_autocast = [x == "on" for x in args.peft_autocast.split(",") if x]
    tok = tokenizer()
    report = {"benchmark": "train_throughput", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else "CPU", "versions": versions(), "virtual_tokens": P, "steps": args.steps, "warmup": args.warmup,
              "pack_tokens": args.pack_tokens, "rows": []}
    if args.out.exists():  # earlier rows are kept; a row measured again replaces its earlier value
        report["rows"] = json.loads(args.out.read_text()).get("rows", [])
    for name in args.models:
        ModelRun(name, args, tok, report, args.out).run()
    write_json(report, args.out)


if __name__ == "__main__":
    main()
