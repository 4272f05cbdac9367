"""Generation with transformers' `generate()` and its KV cache, for every method.

Input prompts go in as ``inputs_embeds`` (causal LMs) or through the encoder
(encoder-decoders). Deep prompts go in as a pre-filled cache: `generate()` continues
from a cache when its ids (and, for a decoder, its mask) span the cached prefix too, so
P placeholder ids stand in front; they carry only the cache's length and are never
embedded.
"""

from __future__ import annotations

from typing import Any

import torch

from . import inject
from .architecture import ModelKind
from .errors import EncodingError, UnsupportedModelError


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             prompt_index: torch.Tensor | None, **generate_kwargs) -> torch.Tensor:
    """See `SoftPromptModel.generate`. Returns (B, N) new tokens only."""
    if model.spec.kind is ModelKind.ENCODER:
        raise UnsupportedModelError(f"{type(model.base).__name__} is an encoder: it cannot generate")
    if not hasattr(model.base, "generate"):
        raise UnsupportedModelError(f"{type(model.base).__name__} has no LM head to generate with")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if prompt_index is None:
        prompt_index = torch.full_like(input_ids, -1)
    if model.spec.kind is ModelKind.CAUSAL and attention_mask[:, -1].eq(0).any():
        raise EncodingError("causal generation continues each row at its end: encode with padding_side='left'")
    generate_kwargs.setdefault("pad_token_id", model.encoder.pad_id if model.encoder else None)
    B = input_ids.shape[0]
    if model.spec.kind is ModelKind.SEQ2SEQ:
        keep = inject.real_token_index(prompt_index)
        encoded = model._encode_seq2seq(input_ids, attention_mask, prompt_index)
        enc_mask = inject.gather_tokens(attention_mask, keep) if model._disabled else attention_mask
        kwargs: dict[str, Any] = dict(encoder_outputs=encoded, attention_mask=enc_mask)
        cache = model._decoder_cache(B)
        if cache is not None:
            # generate() continues from a cache when decoder_input_ids and the decoder mask
            # span the cached prefix too; the P placeholder ids in front are never embedded.
            start = model.base.generation_config.decoder_start_token_id
            if start is None:
                start = model.base.config.decoder_start_token_id
            dec = torch.full((B, model.num_virtual_tokens + 1), int(start), dtype=torch.long, device=input_ids.device)
            kwargs.update(past_key_values=cache, decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec))
            out = model.base.generate(**kwargs, **generate_kwargs)
            return out[:, model.num_virtual_tokens + 1 :]
        out = model.base.generate(**kwargs, **generate_kwargs)
        return out[:, 1:]  # drop the decoder start token
    embeds, mask, prefix, dtype, _ = model._inputs(input_ids, attention_mask, prompt_index)
    if prefix is None:
        return model.base.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
    # Deep prompt: generate() continues from the pre-filled cache; the P placeholder ids
    # in front only carry the cache's length and are never embedded.
    cache = inject.decoder_prefix_cache(prefix, model.spec, model.base.config, B, dtype)
    placeholder = torch.full((B, model.num_virtual_tokens), model.encoder.pad_id if model.encoder else 0,
                             dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([placeholder, input_ids], dim=1)
    out = model.base.generate(
        input_ids=ids, attention_mask=inject.prefix_mask(mask, model.num_virtual_tokens),
        past_key_values=cache, **generate_kwargs,
    )
    return out[:, ids.shape[1] :]

