"""The token loss of a forward, and a causal LM's head run outside its forward.

`token_loss` is the cross-entropy over a batch's real tokens from the whole logits.
`chunked_token_loss` is the same loss of a causal LM from its last-layer states: the frozen
LM head (`lm_head`) runs only at the columns that have a target, a chunk at a time, so a
generation task's step never holds (B, S, V) scores (what `forward.run` computes with
``logits="none"``). `LM_LOSSES` names the kernels that can compute that sum: softprompt's own
chunks, or liger-kernel's fused linear cross-entropy on a GPU (``train.lm_loss``). The serving
engine's scoring reads `lm_head` too, at the positions it scores.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .architecture import ModelKind, ModelSpec, text_config


def token_loss(spec: ModelSpec, logits, labels, keep, prompt_index, mask) -> torch.Tensor:
    """Cross-entropy over real tokens. `labels` (B, T) are aligned to the real tokens;
    they are scattered back to the full row so that a causal LM's shift pairs each
    position with the *next token of the row*, virtual slots included (those targets
    are ignored). `mask` is the attention mask of the row the base model ran on."""
    targets = _column_targets(spec.kind is ModelKind.CAUSAL, labels, keep, prompt_index, mask)
    if spec.kind is ModelKind.CAUSAL:
        logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def _column_targets(causal: bool, labels, keep, prompt_index, mask) -> torch.Tensor:
    """The target of each scored column (-100: none): (B, S) for a masked LM, (B, S - 1)
    for a causal LM (column t's target is the row's token t + 1)."""
    full = torch.full(prompt_index.shape, -100, dtype=labels.dtype, device=labels.device)
    full.scatter_(1, keep, labels)
    if not causal:
        return full
    # A target right after a pad has no real context (left padding): its scores are the
    # pad's, so it is not scored; a row's loss must not depend on its batch.
    return full[:, 1:].masked_fill(mask[:, :-1] == 0, -100)


#: most fp32 scores (positions x vocabulary) one chunk of `chunked_token_loss` holds: 256 MiB
LOSS_CHUNK_SCORES = 2**26

#: the kernels that compute a causal LM's summed token loss from its states (`summed_token_loss`):
#: ``chunks``, softprompt's `_ChunkedLoss` (any device); ``liger``, liger-kernel's fused LM head +
#: cross-entropy (Triton, CUDA devices: 1.09x the chunks' tokens/s and 5% less peak memory at
#: 1B 16 x 512 on an H100, `bench/results/train_lm_kernels_h100.json`)
LM_LOSSES = ("chunks", "liger")


def chunkable(base) -> bool:
    """Whether `base`'s LM head can run outside its forward (`lm_head`, `chunked_token_loss`):
    a frozen head (no gradient for it) whose weights are whole on this process (not a
    sharded FSDP 2 parameter)."""
    head = base.get_output_embeddings()
    if head is None or head.weight.requires_grad:
        return False
    from torch.distributed.tensor import DTensor

    return not isinstance(head.weight, DTensor)


def chunked_token_loss(base, hidden: torch.Tensor, labels, keep, prompt_index, mask,
                       kernel: str = "chunks") -> torch.Tensor:
    """`token_loss` of a causal LM from its last-layer states `hidden` (B, S, D): the LM head
    runs only at the columns that have a target (a generation task's answer tokens, not
    its input), `LOSS_CHUNK_SCORES` scores at a time, and each chunk's gradient with
    respect to its states is taken as the chunk is scored (`_ChunkedLoss`): memory holds one
    chunk's scores, never (B, S, V) scores or their gradient. Same value and gradients as
    `token_loss` over the whole logits (tested). `kernel`: one of `LM_LOSSES`."""
    targets = _column_targets(True, labels, keep, prompt_index, mask)  # (B, S - 1)
    scored = targets != -100
    states, wanted = hidden[:, :-1][scored], targets[scored]  # (N, D), (N,)
    return summed_token_loss(base, states, wanted, kernel) / wanted.numel()


def summed_token_loss(base, states: torch.Tensor, wanted: torch.Tensor, kernel: str = "chunks") -> torch.Tensor:
    """The summed next-token cross-entropy of N positions from their last-layer states
    `states` (N, D) and targets `wanted` (N,): through `lm_head`, `LOSS_CHUNK_SCORES` scores
    at a time (`_ChunkedLoss`, ``kernel="chunks"``), or by liger-kernel's fused linear
    cross-entropy (``"liger"``, where `fused_loss_refusal` finds nothing against it). One
    function, so that `bench.train.throughput` can measure other fused kernels
    (cut-cross-entropy) in its place on the same step (patched on this module, where
    `chunked_token_loss` looks it up)."""
    if kernel == "liger":
        return _liger_loss(base, states, wanted)
    chunk = max(1, LOSS_CHUNK_SCORES // base.get_output_embeddings().weight.shape[0])
    return _ChunkedLoss.apply(states, wanted, base, chunk)


def fused_loss_refusal(base, device: torch.device) -> str | None:
    """Why liger-kernel's fused loss cannot stand for `lm_head` + cross-entropy on `base`
    (None: it can): it runs Triton kernels on CUDA devices; it multiplies by the head's
    weight (and bias) and applies a soft cap, so a head that scales its scores (Granite,
    Cohere) is left to the chunks; and it needs the head whole and frozen (`chunkable`)."""
    if device.type != "cuda":
        return f"liger-kernel runs on CUDA devices, not on the {device.type.upper()}"
    if not chunkable(base):
        return "the LM head is trained or sharded (the whole scores are computed)"
    config = text_config(base.config)
    if score_scalings(config):
        return f"{config.model_type}'s LM head scales its scores"
    return None


def score_scalings(config) -> list:
    """The scalings a family's forward applies to its head's scores, in order, as functions
    of the scores (Granite divides by ``logits_scaling``, Cohere multiplies by
    ``logit_scale``); empty where there is none. The one home of these conditions for
    `lm_head` and `fused_loss_refusal`."""
    scalings = []
    if getattr(config, "logits_scaling", None):  # Granite
        scalings.append(lambda logits: logits / config.logits_scaling)
    if isinstance(getattr(config, "logit_scale", None), (int, float)):  # Cohere
        scalings.append(lambda logits: logits * config.logit_scale)
    return scalings


def _liger_loss(base, states: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """`summed_token_loss` by liger-kernel: the head's product and the cross-entropy fused,
    a chunk of positions at a time, the states' gradient computed in the forward (as
    `_ChunkedLoss` does). Gemma's final soft cap is liger's ``softcap``."""
    from .extras import require

    functional = require("liger_kernel.transformers.functional", "liger", "train.lm_loss=liger")
    head = base.get_output_embeddings()
    fused = functional.liger_fused_linear_cross_entropy
    options = {}
    if "chunk_mem_const" in inspect.signature(fused).parameters:  # liger-kernel >= 0.8
        options["chunk_mem_const"] = liger_chunk_budget(states.shape[0], *head.weight.shape)
    return fused(states, head.weight, wanted, bias=head.bias, reduction="sum",
                 softcap=getattr(text_config(base.config), "final_logit_softcapping", None) or None, **options)


def liger_chunk_budget(positions: int, vocab: int, hidden: int) -> int:
    """liger-kernel's ``chunk_mem_const`` for `positions` states of width `hidden` scored over
    `vocab` words: the largest that keeps a chunk within twice `LOSS_CHUNK_SCORES` scores
    (what softprompt's own chunks hold; liger keeps them in the states' dtype, bf16: half
    the bytes), so the fewest chunks that fit.

    Why: liger sizes a chunk to hold ``chunk_mem_const * positions * hidden`` scores (1 by
    default: the states' own size), the right size when the head trains, whose gradient is
    the same whatever the chunk. A soft prompt's head is frozen, and every chunk reads the
    whole head twice (its scores, then the states' gradient): on an H100 a packed 8 x 1024
    step of a 1B Llama (128,256 words) ran 47 chunks of 64 positions, 16.7 ms of the loss
    reading the 525 MB head 94 times (`bench/results/train_profile_packed_instruct_h100.json`);
    3 chunks of 1024 read it 6 times.
    """
    best = 1
    for budget in range(1, -(-vocab // hidden) + 1):  # beyond: one chunk, as at the last
        if liger_chunk(positions, vocab, hidden, budget) * vocab > 2 * LOSS_CHUNK_SCORES:
            break
        best = budget
    return best


def liger_chunk(positions: int, vocab: int, hidden: int, budget: int) -> int:
    """The positions a chunk of liger-kernel's fused loss holds for ``chunk_mem_const``
    `budget` (its arithmetic, ops/fused_linear_cross_entropy.py in 0.8.5): ``inc =
    ceil(vocab / (budget * hidden))`` chunks' worth, rounded up to a power of two."""
    inc = -(-vocab // (budget * hidden))
    return min(1 << (-(-positions // inc) - 1).bit_length(), positions)


class _ChunkedLoss(torch.autograd.Function):
    """Summed cross-entropy of N positions' next-token scores from their states (N, D),
    a chunk of positions at a time. The head is frozen, so the only gradient is the states':
    each chunk's is computed in the forward, while its scores are at hand, and kept (N, D);
    the backward scales it. Nothing is recomputed, and no chunk's scores outlive it."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, targets: torch.Tensor, base, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        grads = torch.zeros_like(states)
        for i in range(0, states.shape[0], chunk):
            with torch.enable_grad():
                part = states[i: i + chunk].detach().requires_grad_()
                loss = F.cross_entropy(lm_head(base, part).float(), targets[i: i + chunk], reduction="sum")
                (grads[i: i + chunk],) = torch.autograd.grad(loss, part)
            total += loss.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grads * grad.to(grads.dtype), None, None, None


def lm_head(base, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's scores from its last-layer states, as its own forward computes them at
    those positions: its output embeddings, then the final scaling of the families that
    have one (Gemma's soft cap, Granite's and Cohere's logit scales). For scores at
    positions spread over rows, which ``logits_to_keep`` (one set of columns for the whole
    batch) cannot pick without computing nearly every column.

    Args:
        hidden: (..., D) states after the final norm (``hidden_states[-1]``).

    Returns:
        (..., V) scores in the head's dtype.
    """
    config = text_config(base.config)
    logits = base.get_output_embeddings()(hidden)
    for scale in score_scalings(config):
        logits = scale(logits)
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2 and 3
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


__all__ = ["token_loss", "chunked_token_loss", "summed_token_loss", "chunkable", "fused_loss_refusal", "lm_head",
           "LM_LOSSES", "LOSS_CHUNK_SCORES"]
