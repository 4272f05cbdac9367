"""One forward of the frozen base model with prompts given row by row.

`SoftPromptModel` runs every row with its own prompt; the serving engine runs each row
with its task's prompt. Both describe what to apply as `Prompts` (input tables and a deep
key/value prefix, shared or per row, with a per-row mask over the prefix positions) and
call `run` / `generate` here, so that one code path turns prompts into a forward.
`inject.py` remains the one place that touches the base model's inputs (`Prompts`, and
`inject.base_inputs` for causal LMs and encoders); `loss.py` holds the token losses and the
LM head run outside the forward (`forward.token_loss` and the others still import from here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from . import inject, packing
from .attention import attention_for
from .architecture import ModelKind, ModelSpec
from .inject import Prompts, embed
from .errors import ConfigError, EncodingError, UnsupportedModelError
from .loss import chunkable, chunked_token_loss, lm_head, token_loss

LOGITS = ("all", "answer", "last", "none")


@dataclass
class SoftPromptOutput(ModelOutput):
    """What a forward with prompts returns. Token-level tensors cover the real tokens
    only (T = S - P), in the order of the row: the virtual slots are taken out.

    Attributes:
        loss: scalar, when labels were given.
        logits: (B, T, V) for causal and masked LMs; (B, T_dec, V) decoder logits for
            encoder-decoders; None for a bare encoder, and when the forward was asked for
            ``logits="answer"`` or ``"none"``. With ``logits="last"`` (causal LMs): (B, 1, V)
            the scores at each row's last column (left-padded rows: the next token's, what
            generation continues from), not aligned to the real tokens.
        last_hidden_state: (B, T, D) last-layer states of the real tokens (encoder side of
            an encoder-decoder); for models with an LM head only with ``output_hidden_states=True``.
        answer_logits: (B, V) the output at each row's answer slot ([MASK]), when the
            template has one and the model has an LM head.
        attention_mask: (B, T) which of the T positions are real tokens (not pads).
        field_index: (B, T) template field of each token (-1: anchor, special, pad).
        word_index: (B, T) word number of each token within a pre-split field (-1 else).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    answer_logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    field_index: torch.Tensor | None = None
    word_index: torch.Tensor | None = None


def run(base, spec: ModelSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor,
        prompts: Prompts, *, answer_index: torch.Tensor | None = None, field_index: torch.Tensor | None = None,
        word_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
        logits: str = "all", lm_head_columns: bool = False, virtual_tokens: int | None = None,
        base_forward: Callable[[Any, dict[str, Any]], Any] | None = None,
        pack_index: torch.Tensor | None = None, lm_loss: str = "chunks") -> SoftPromptOutput:
    """Run `base` on a batch with `prompts` (see `SoftPromptModel.forward` for the arguments).

    Args:
        lm_head_columns: `base` takes ``logits_to_keep`` (`SoftPromptModel.keeps_logits`).
        virtual_tokens: every row must hold exactly this many virtual slots (checked).
        base_forward: runs the base model (causal LMs and encoders) as
            ``base_forward(base, inputs)`` instead of ``base(**inputs)``: the server's
            compiled forward (`serve.compiled`).
        pack_index: (N, W) run the base on the batch's rows packed into N sequences
            (`packing.py`): same outputs, read in the padded (B, S) layout.
        lm_loss: the kernel of a causal LM's loss from its states (``logits="none"`` with
            labels): one of `loss.LM_LOSSES`.

    The forward waits for the device at most twice before the base model runs (the rows'
    virtual-slot counts, and the answer columns when the LM head is applied there only):
    a training step's host work overlaps the device's otherwise.
    """
    if logits not in LOGITS:
        raise ConfigError(f"logits must be one of {', '.join(map(repr, LOGITS))}, got {logits!r}")
    if labels is not None and logits not in ("all", "none"):
        raise ConfigError("a token loss (labels=...) reads the scores of every position: use logits='all' (or "
                          "'none': a causal LM's loss computed a chunk of positions at a time, no logits returned)")
    # a causal LM's token loss from its last-layer states, a chunk at a time (`chunked_token_loss`)
    chunked = labels is not None and logits == "none"
    if chunked and spec.kind is not ModelKind.CAUSAL:
        raise ConfigError("logits='none' with labels computes a causal LM's loss in chunks; "
                          f"{spec.model_type} is not a causal LM: use logits='all'")
    if chunked and not chunkable(base):
        chunked, logits = False, "all"  # e.g. FSDP-sharded head: the whole (B, S, V) scores, as before
    if pack_index is not None and (why := packing.refusal(base, spec)) is not None:
        raise UnsupportedModelError(f"cannot pack rows: {why}")
    keep = _real_tokens(attention_mask, prompt_index, virtual_tokens)  # (B, T)
    align = lambda x: None if x is None else inject.gather_tokens(x, keep)  # noqa: E731
    aligned = _aligned(keep, attention_mask, prompt_index, field_index, word_index)
    if spec.kind is ModelKind.SEQ2SEQ:  # decoder logits: what generation and its loss read
        encoded = encode_seq2seq(base, spec, input_ids, attention_mask, prompt_index, prompts)
        out = _run_decoder(base, spec, encoded, attention_mask, prompts, labels, decoder_input_ids)
        return SoftPromptOutput(loss=out.loss, logits=out.logits, last_hidden_state=align(encoded.last_hidden_state),
                                **aligned)
    if pack_index is not None:
        all_logits, hidden = _run_packed(base, spec, input_ids, attention_mask, prompt_index, prompts, pack_index,
                                         logits, lm_head_columns, base_forward)
        position, columns = _answer_columns(answer_index, logits, False)[:2]
    else:
        position, columns, logits_to_keep = _answer_columns(answer_index, logits, lm_head_columns)
        inputs = inject.base_inputs(base, spec, input_ids, attention_mask, prompt_index, prompts,
                                    logits_to_keep=logits_to_keep)
        with attention_for(inputs["inputs_embeds"].device):  # no cuDNN attention in a training step (see attention.py)
            inputs["output_hidden_states"] = output_hidden_states or chunked or None
            out = base(**inputs) if base_forward is None else base_forward(base, inputs)
        all_logits = getattr(out, "logits", None)  # (B, S, V), (B, K, V), or None for a bare encoder
        hidden = getattr(out, "last_hidden_state", None)  # bare models
        if hidden is None and (output_hidden_states or chunked):
            hidden = out.hidden_states[-1]  # models with an LM head
    if chunked:
        loss = chunked_token_loss(base, hidden, labels, keep, prompt_index, attention_mask, lm_loss)
        return SoftPromptOutput(loss=loss, last_hidden_state=align(hidden) if output_hidden_states else None,
                                **aligned)
    answer_logits = None
    if all_logits is not None and position is not None:
        at = position if columns is None else torch.searchsorted(columns, position)
        answer_logits = all_logits[torch.arange(input_ids.shape[0], device=all_logits.device), at]  # (B, V)
    elif pack_index is not None and position is not None and hidden is not None:  # a packed causal LM's head, here
        answer_logits = lm_head(base, hidden[torch.arange(input_ids.shape[0], device=hidden.device), position])
    loss = None
    if labels is not None and all_logits is not None:
        loss = token_loss(spec, all_logits, labels, keep, prompt_index, attention_mask)
    if logits == "last" and all_logits is not None:
        return SoftPromptOutput(logits=all_logits[:, -1:], last_hidden_state=align(hidden), **aligned)
    return SoftPromptOutput(loss=loss, logits=align(all_logits) if logits == "all" else None,
                            last_hidden_state=align(hidden), answer_logits=answer_logits, **aligned)


def _run_packed(base, spec: ModelSpec, input_ids, attention_mask, prompt_index, prompts: Prompts,
                pack_index: torch.Tensor, logits: str, lm_head_columns: bool, base_forward):
    """The base model's forward over the batch packed by `pack_index` (`packing.py`).

    Returns:
        all_logits: (B, S, V) scores in the padded layout, or None: none asked for, a bare
            encoder, or a causal LM whose head `run` applies where it reads it
            (`lm_head`, at the answer columns or the scored ones).
        hidden: (B, S, D) the last-layer states in the padded layout (zeros at its pads).
    """
    if logits == "last":
        raise ConfigError("a packed forward scores every row's own columns: logits='last' reads a padded row's end")
    B, S = input_ids.shape
    # a frozen causal LM head runs outside the base, only where it is read (the padded path's
    # logits_to_keep columns are columns of the padded rows, which the packed base does not have)
    outside = spec.kind is ModelKind.CAUSAL and chunkable(base) and logits != "all"
    keep = 1 if outside and lm_head_columns else None  # the fewest the base's own head computes
    inputs = packing.packed_inputs(base, spec, input_ids, attention_mask, prompt_index, prompts, pack_index,
                                   logits_to_keep=keep)
    with attention_for(inputs["inputs_embeds"].device):
        inputs["output_hidden_states"] = True if base.get_output_embeddings() is not None else None
        out = base(**inputs) if base_forward is None else base_forward(base, inputs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1]
    hidden = packing.unpack(hidden, pack_index, B, S)
    all_logits = getattr(out, "logits", None)
    if outside or all_logits is None:
        return None, hidden
    return packing.unpack(all_logits, pack_index, B, S), hidden


def over_real_tokens(attention_mask: torch.Tensor, prompt_index: torch.Tensor, *, hidden: torch.Tensor | None = None,
                     answer_logits: torch.Tensor | None = None, field_index: torch.Tensor | None = None,
                     word_index: torch.Tensor | None = None) -> SoftPromptOutput:
    """What `run` returns for a forward made elsewhere (the serving engine's graphed head
    forwards, `serve/graphed.py`) over the batch (B, S) `attention_mask` / `prompt_index`.

    Args:
        hidden: (B, S, D) last-layer states of every column (virtual slots included).
        answer_logits: (B, V) at each row's answer slot.
    """
    keep = _real_tokens(attention_mask, prompt_index, None)
    return SoftPromptOutput(last_hidden_state=None if hidden is None else inject.gather_tokens(hidden, keep),
                            answer_logits=answer_logits,
                            **_aligned(keep, attention_mask, prompt_index, field_index, word_index))


def _aligned(keep: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor,
             field_index: torch.Tensor | None, word_index: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The token-level tensors of the batch at its real tokens `keep` (B, T)."""
    align = lambda x: None if x is None else inject.gather_tokens(x, keep)  # noqa: E731
    # A row with more virtual slots than another of the batch (tasks of a mixed batch) ends
    # its T entries with virtual positions: they are not real tokens.
    return dict(attention_mask=align(attention_mask * (prompt_index < 0)), field_index=align(field_index),
                word_index=align(word_index))


def _real_tokens(attention_mask: torch.Tensor, prompt_index: torch.Tensor, virtual_tokens: int | None) -> torch.Tensor:
    """(B, T) positions of each row's real tokens (`inject.real_token_index`), after the
    checks that need the rows' virtual-slot counts: one read of the device for all."""
    counts = (prompt_index >= 0).sum(1)  # (B,) virtual slots per row
    # one read for the check, for T, and for a row with no token at all
    fewest, most, shortest = torch.stack([*torch.aminmax(counts), attention_mask.sum(1).min().to(counts.dtype)]).tolist()
    if shortest == 0:
        _refuse_empty_rows(attention_mask)
    if virtual_tokens is not None and not fewest == most == virtual_tokens:
        raise EncodingError(f"every row needs its {virtual_tokens} virtual slots in prompt_index; "
                            "build batches with encode()")
    return inject.real_token_index(prompt_index, fewest)


def _answer_columns(answer_index: torch.Tensor | None, logits: str, lm_head_columns: bool):
    """Where each row's answer logits are read, and the columns the LM head computes.

    Returns:
        position: (B,) each row's answer column, or None (no answer logits wanted).
        columns: (K,) the sorted answer columns the LM head computes alone (``position``
            indexes into them), or None (``position`` indexes the row).
        logits_to_keep: what the base is given (None: every column).
    """
    answers: list[int] = []  # the distinct answer columns of the batch, -1 for rows without one
    if logits not in ("none", "last") and answer_index is not None:
        answers = answer_index.unique().tolist()
    position = answer_index.clamp(min=0) if answers and answers[-1] >= 0 else None
    if logits == "all" or not lm_head_columns:
        return position, None, None
    if position is None or logits == "last":
        return None, None, 1  # the fewest the LM head computes (the last column)
    # K = 1 when every row ends at its answer
    columns = torch.tensor(sorted({max(c, 0) for c in answers}), device=answer_index.device)
    return position, columns, columns


def _run_decoder(base, spec: ModelSpec, encoded: BaseModelOutput, attention_mask: torch.Tensor, prompts: Prompts,
                 labels: torch.Tensor | None, decoder_input_ids: torch.Tensor | None):
    """An encoder-decoder's decoder over `encoded`, with the decoder layers' deep prefix."""
    if decoder_input_ids is None:
        if labels is None:
            raise EncodingError("an encoder-decoder forward needs decoder_input_ids or labels")
        decoder_input_ids = base.prepare_decoder_input_ids_from_labels(labels=labels)
    dec_mask = None  # the decoder's default mask, unless rows use prefixes of different lengths
    if prompts.prefix is not None and prompts.prefix_mask is not None:
        dec_mask = prompts.full_mask(torch.ones_like(decoder_input_ids))
    with attention_for(attention_mask.device):
        return base(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=dec_mask, labels=labels, use_cache=False, return_dict=True,
                    **{inject.CACHE_ARG: decoder_cache(base, spec, prompts, attention_mask.shape[0])})


def _refuse_empty_rows(attention_mask: torch.Tensor) -> None:
    """A row of no token at all (an empty input through a template with nothing else, e.g.
    ``"{text}"`` with a deep prompt on a tokenizer without leading specials) has nothing for
    the model to read: alone the model fails deep inside (a reshape of 0 elements), and in a
    batch its outputs would be read off padding. Refuse it with an error that says so."""
    empty = attention_mask.sum(1).eq(0).nonzero().flatten().tolist()
    if empty:
        raise EncodingError(f"row(s) {empty} of the batch have no tokens: an empty input through a template with no "
                            "other text, virtual tokens or special tokens gives the model nothing to read")


def encode_seq2seq(base, spec: ModelSpec, input_ids, attention_mask, prompt_index, prompts: Prompts) -> BaseModelOutput:
    """Run the encoder of an encoder-decoder with the input prompts or the deep prefix."""
    embeds = embed(base, input_ids, attention_mask, prompt_index, prompts)
    encoder = base.get_encoder()
    if prompts.prefix is None:
        return encoder(inputs_embeds=embeds, attention_mask=attention_mask, return_dict=True)
    cache = inject.encoder_prefix_cache(prompts.prefix, spec, input_ids.shape[0], inject.embedding_dtype(base))
    with inject.encoder_prefix_hooks(encoder, spec, cache):
        return encoder(inputs_embeds=embeds, attention_mask=prompts.full_mask(attention_mask), return_dict=True)


def decoder_cache(base, spec: ModelSpec, prompts: Prompts, batch_size: int, *, generating: bool = False):
    """The decoder's pre-filled self-attention cache of an encoder-decoder (None: no deep
    prompt): read-only for a forward, growing for generation."""
    if prompts.prefix is None:
        return None
    if generating:
        return inject.decoder_prefix_cache(prompts.prefix, spec, base.config, batch_size, inject.embedding_dtype(base))
    return inject.forward_decoder_cache(prompts.prefix, spec, batch_size, inject.embedding_dtype(base))


def generate(base, spec: ModelSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor,
             prompts: Prompts, pad_id: int, **generate_kwargs) -> torch.Tensor:
    """transformers' `generate()` with prompts and its KV cache. Returns (B, N) new tokens only.

    Input prompts go in as ``inputs_embeds`` (causal LMs) or through the encoder
    (encoder-decoders). Deep prompts go in as a pre-filled cache: `generate()` continues
    from a cache when its ids (and, for a decoder, its mask) span the cached prefix too, so
    P placeholder ids stand in front; they carry only the cache's length and are never
    embedded.
    """
    if spec.kind is ModelKind.ENCODER:
        raise UnsupportedModelError(f"{type(base).__name__} is an encoder: it cannot generate")
    if not hasattr(base, "generate"):
        raise UnsupportedModelError(f"{type(base).__name__} has no LM head to generate with")
    _refuse_empty_rows(attention_mask)
    if spec.kind is ModelKind.CAUSAL and attention_mask[:, -1].eq(0).any():
        raise EncodingError("causal generation continues each row at its end: encode with padding_side='left'")
    generate_kwargs.setdefault("pad_token_id", pad_id)
    B, P = input_ids.shape[0], prompts.prefix_length
    if spec.kind is ModelKind.SEQ2SEQ:
        encoded = encode_seq2seq(base, spec, input_ids, attention_mask, prompt_index, prompts)
        kwargs: dict[str, Any] = dict(encoder_outputs=encoded, attention_mask=attention_mask)
        cache = decoder_cache(base, spec, prompts, B, generating=True)
        if cache is None:
            return base.generate(**kwargs, **generate_kwargs)[:, 1:]  # drop the decoder start token
        start = base.generation_config.decoder_start_token_id
        if start is None:
            start = base.config.decoder_start_token_id
        dec = torch.full((B, P + 1), int(start), dtype=torch.long, device=input_ids.device)
        dec_mask = prompts.full_mask(torch.ones((B, 1), dtype=torch.long, device=input_ids.device))
        kwargs.update({inject.CACHE_ARG: cache}, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        return base.generate(**kwargs, **generate_kwargs)[:, P + 1 :]
    embeds = embed(base, input_ids, attention_mask, prompt_index, prompts)
    if prompts.prefix is None:
        return base.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
    cache = inject.decoder_prefix_cache(inject.local_kv_heads(prompts.prefix, base), spec, base.config, B,
                                        inject.embedding_dtype(base))
    placeholder = torch.full((B, P), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([placeholder, input_ids], dim=1)
    inputs: dict[str, Any] = {}
    if prompts.tables is not None:
        # Rows with input prompts beside rows with deep prompts (a mixed batch): generate()
        # embeds only the uncached columns, so the P cached ones get placeholders here too.
        inputs["inputs_embeds"] = torch.cat([embeds.new_zeros(B, P, embeds.shape[-1]), embeds], dim=1)
    out = base.generate(input_ids=ids, attention_mask=prompts.full_mask(attention_mask),
                        **{inject.CACHE_ARG: cache}, **inputs, **generate_kwargs)
    return out[:, ids.shape[1] :]


def drop_virtual_slots(batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The batch without its virtual slots (the bare base model on the real tokens): the
    token tensors shortened to T, the answer column moved left past the slots before it."""
    prompt_index = batch["prompt_index"]
    keep = inject.real_token_index(prompt_index)
    out = {k: (None if v is None else inject.gather_tokens(v, keep))
           for k, v in batch.items() if k in ("input_ids", "attention_mask", "field_index", "word_index")}
    out["prompt_index"] = torch.full_like(out["input_ids"], -1)
    answer = batch.get("answer_index")
    if answer is not None:
        columns = torch.arange(prompt_index.shape[1], device=answer.device)
        before = ((prompt_index >= 0) & (columns < answer.clamp(min=0)[:, None])).sum(1)
        out["answer_index"] = torch.where(answer >= 0, answer - before, answer)
    return out


__all__ = ["Prompts", "SoftPromptOutput", "run", "over_real_tokens", "generate", "encode_seq2seq", "decoder_cache",
           "token_loss", "drop_virtual_slots"]
