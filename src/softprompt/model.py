"""SoftPromptModel: one frozen base model and one trainable soft prompt.

The model branches only on *input* versus *deep* prompts (inject.py does the rest), and
on the model kind: causal LM, encoder, or encoder-decoder.
"""

from __future__ import annotations

import inspect

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from . import inject
from .architecture import ModelKind, ModelSpec, _forward_takes, base_identity, model_spec
from .encode import PromptBatch, TemplateEncoder
from .errors import ConfigError, EncodingError, UnsupportedModelError
from .methods import PromptConfig, PromptModule, build_module


@dataclass
class SoftPromptOutput(ModelOutput):
    """What `SoftPromptModel.forward` returns. Token-level tensors cover the real tokens
    only (T = S - P), in the order of the row: the virtual slots are taken out.

    Attributes:
        loss: scalar, when labels were given.
        logits: (B, T, V) for causal and masked LMs; (B, T_dec, V) decoder logits for
            encoder-decoders; None for a bare encoder, and when `forward` was asked for
            ``logits="answer"`` or ``"none"``.
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


class SoftPromptModel(nn.Module):
    """A frozen transformers model with one soft prompt.

    Args:
        base: any transformers model of a supported family (causal LM, BERT-style
            encoder, T5/BART encoder-decoder), with or without a task head. Its
            parameters are frozen (``requires_grad=False``) and never modified.
        config: a method config (`PromptTuningConfig`, `PTuningConfig`,
            `PrefixTuningConfig`, `PTuningV2Config`).
        tokenizer: the base model's tokenizer; needed by `encode` and some inits.
        prompt: an already built prompt module (used by `from_pretrained`).

    Example:
        >>> model = SoftPromptModel(base, PTuningConfig(template="[P:3] {text} [P:3] It was [MASK] ."), tokenizer=tok)
        >>> batch = model.encode([{"text": "a gem of a film"}])
        >>> out = model(**batch)   # out.answer_logits: (1, V)
    """

    def __init__(self, base: nn.Module, config: PromptConfig, tokenizer=None, *, prompt: PromptModule | None = None):
        super().__init__()
        if not isinstance(config, PromptConfig):
            raise ConfigError(f"config must be a method config such as PromptTuningConfig, got {type(config).__name__}")
        config.validate()
        self.template, self.num_virtual_tokens = config.resolve()
        self.config = config
        self.base = base
        self.tokenizer = tokenizer
        self.spec: ModelSpec = model_spec(base)
        self.deep = config.deep
        if self.deep and self.spec.kind is ModelKind.ENCODER and not _forward_takes(base, "past_key_values"):
            raise UnsupportedModelError(
                f"{type(base).__name__} takes no past_key_values: a deep prompt cannot be injected into it"
            )
        if self.deep and self.spec.kind is ModelKind.SEQ2SEQ and self.spec.encoder_self_attention is None:
            raise UnsupportedModelError(
                f"{type(base).__name__} ({self.spec.model_type}): a deep prompt cannot be injected into its encoder; "
                f"supported encoder-decoder families: t5, mt5, bart, mbart"
            )
        for p in base.parameters():
            p.requires_grad_(False)
        embeddings = base.get_input_embeddings().weight
        self.prompt = prompt if prompt is not None else build_module(
            config, self.num_virtual_tokens, self.spec, embeddings, tokenizer
        )
        self.prompt.to(embeddings.device)
        self.encoder = (
            TemplateEncoder(self.template, tokenizer, self.spec, self.num_virtual_tokens if self.deep else 0)
            if tokenizer is not None
            else None
        )
        self._disabled = False
        # Causal LMs of transformers 5 apply their LM head only at the columns named by
        # `logits_to_keep`: (B, S, V) logits are the largest tensor of a step otherwise.
        self._keeps_logits = (self.spec.kind is ModelKind.CAUSAL
                              and "logits_to_keep" in inspect.signature(base.forward).parameters)

    # -- identity -------------------------------------------------------------
    @property
    def identity(self):
        return base_identity(self.base, self.spec)

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    @property
    def padding_side(self) -> str:
        """Default padding: left for causal LMs (generation continues at the end of
        every row), right for the rest; families that take no position ids are always
        right-padded."""
        return "left" if self.spec.kind is ModelKind.CAUSAL and self.spec.accepts_position_ids else "right"

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- encoding -------------------------------------------------------------
    def encode(
        self,
        examples: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        *,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> PromptBatch:
        """Render examples through the template, tokenize, mark virtual slots, pad.

        Args:
            examples: one example or a list; each maps the template's fields to text
                (or to a list of words).
            padding_side: ``left`` / ``right``; default `padding_side`.
            max_length: most tokens per row, virtual slots included.

        Returns:
            A `PromptBatch` of (B, S) tensors, on the model's device.
        """
        if self.encoder is None:
            raise ConfigError("encode() needs a tokenizer: pass tokenizer=... to SoftPromptModel")
        if isinstance(examples, Mapping):
            examples = [examples]
        side = padding_side or self.padding_side
        if side == "left" and not self.spec.accepts_position_ids:
            raise ConfigError(
                f"{self.spec.model_type} takes no position ids, so left padding would shift its positions; "
                "use padding_side='right'"
            )
        rows = [self.encoder.encode(ex, max_length=max_length, index=i) for i, ex in enumerate(examples)]
        return self.encoder.collate(rows, side).to(self.device)

    # -- the prompt -----------------------------------------------------------
    @contextmanager
    def disable_prompt(self) -> Iterator[None]:
        """Within the block, the model behaves as the bare base model on the real tokens."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def export(self) -> torch.Tensor:
        """The collapsed inference tensor: (P, D) for input methods, (L, 2, H_kv, P, D_head) for deep ones."""
        return self.prompt.export()

    # -- forward --------------------------------------------------------------
    def _inputs(self, input_ids, attention_mask, prompt_index):
        """Shared set-up: embeddings with input prompts, the deep prefix, masks, positions."""
        B = input_ids.shape[0]
        embed = self.base.get_input_embeddings()
        dtype = embed.weight.dtype
        prefix = None
        if self._disabled:
            keep = inject.real_token_index(prompt_index)
            input_ids = inject.gather_tokens(input_ids, keep)
            attention_mask = inject.gather_tokens(attention_mask, keep)
            embeds = embed(input_ids)
        elif self.deep:
            embeds = embed(input_ids)
            prefix = self.prompt()  # (L, 2, H_kv, P, D_head), once per step for the whole batch
        else:
            embeds = inject.place_input_prompts(embed(input_ids), prompt_index, self.prompt())
        return embeds, attention_mask, prefix, dtype, B

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_index: torch.Tensor | None = None,
        answer_index: torch.Tensor | None = None,
        field_index: torch.Tensor | None = None,
        word_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits: str = "all",
    ) -> SoftPromptOutput:
        """Run the base model with the prompt.

        Args:
            input_ids: (B, S) from `encode` (virtual slots hold a pad id).
            attention_mask: (B, S) 1 for virtual and real tokens, 0 for pads.
            prompt_index: (B, S) prompt-table row at virtual slots, -1 elsewhere.
            answer_index: (B,) position of the answer slot, -1 for none.
            field_index, word_index: (B, S) alignment metadata, returned aligned to T.
            labels: (B, T) token targets aligned to the real tokens (causal LM: next-token
                targets, shifted internally; masked LM: per-token targets), -100 ignored;
                for an encoder-decoder, (B, T_dec) decoder targets.
            decoder_input_ids: (B, T_dec) for an encoder-decoder (default: labels shifted right).
            output_hidden_states: also return `last_hidden_state` for models with an LM head.
            logits: which LM-head outputs to compute: ``"all"`` (every position, as
                `logits`), ``"answer"`` (only `answer_logits`: a causal LM applies its LM
                head at the answer columns alone) or ``"none"`` (no logits returned: for
                heads over hidden states; a causal LM computes one column). Labels need
                ``"all"``.

        Returns:
            `SoftPromptOutput`.
        """
        if logits not in ("all", "answer", "none"):
            raise ConfigError(f"logits must be 'all', 'answer' or 'none', got {logits!r}")
        if labels is not None and logits != "all":
            raise ConfigError("a token loss (labels=...) reads the logits of every position: use logits='all'")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_index is None:
            prompt_index = torch.full_like(input_ids, -1)
        if not self.deep and not self._disabled and (prompt_index >= 0).sum(1).ne(self.num_virtual_tokens).any():
            raise EncodingError(
                f"every row needs its {self.num_virtual_tokens} virtual slots in prompt_index; build batches with encode()"
            )
        keep = inject.real_token_index(prompt_index)  # (B, T)
        if self.spec.kind is ModelKind.SEQ2SEQ:  # decoder logits: what generation and its loss read
            return self._forward_seq2seq(input_ids, attention_mask, prompt_index, keep, answer_index,
                                         field_index, word_index, labels, decoder_input_ids)
        embeds, mask, prefix, dtype, B = self._inputs(input_ids, attention_mask, prompt_index)
        kwargs: dict[str, Any] = {}
        if prefix is not None:
            full_mask = inject.prefix_mask(mask, self.num_virtual_tokens)
            kwargs["past_key_values"] = (
                inject.decoder_prefix_cache(prefix, self.spec, self.base.config, B, dtype)
                if self.spec.kind is ModelKind.CAUSAL
                else inject.encoder_prefix_cache(prefix, self.spec, B, dtype)
            )
            positions = inject.position_ids(full_mask, self.spec)[:, self.num_virtual_tokens :]
        else:
            full_mask = mask
            positions = inject.position_ids(mask, self.spec)
        if self.spec.accepts_position_ids:
            kwargs["position_ids"] = positions
        wants_answer = logits != "none" and answer_index is not None and bool((answer_index >= 0).any())
        position = columns = None
        if wants_answer:
            position = answer_index.clamp(min=0)  # (B,) column of the answer slot in the row
            if self._disabled:  # the answer moved left by the virtual slots before it
                before = ((prompt_index >= 0) & (torch.arange(prompt_index.shape[1], device=position.device) < position[:, None])).sum(1)
                position = position - before
        if logits != "all" and self._keeps_logits:
            if wants_answer:
                columns = torch.unique(position)  # (K,) sorted; K = 1 when every row ends at its answer
                kwargs["logits_to_keep"] = columns
            else:
                kwargs["logits_to_keep"] = 1  # the fewest the LM head computes
        out = self.base(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False,
                        output_hidden_states=output_hidden_states or None, return_dict=True, **kwargs)
        all_logits = getattr(out, "logits", None)  # (B, S, V), (B, K, V), or None for a bare encoder
        hidden = getattr(out, "last_hidden_state", None)  # bare models
        if hidden is None and output_hidden_states:
            hidden = out.hidden_states[-1]  # models with an LM head
        align = (lambda x: x) if self._disabled else (lambda x: inject.gather_tokens(x, keep))
        answer_logits = None
        if all_logits is not None and wants_answer:
            at = position if columns is None else torch.searchsorted(columns, position)
            answer_logits = all_logits[torch.arange(B, device=all_logits.device), at]  # (B, V)
        loss = None
        if labels is not None and all_logits is not None:
            loss = self._token_loss(all_logits, labels, keep, prompt_index, mask)
        return SoftPromptOutput(
            loss=loss,
            logits=None if all_logits is None or logits != "all" else align(all_logits),
            last_hidden_state=None if hidden is None else align(hidden),
            answer_logits=answer_logits,
            attention_mask=inject.gather_tokens(attention_mask, keep),
            field_index=None if field_index is None else inject.gather_tokens(field_index, keep),
            word_index=None if word_index is None else inject.gather_tokens(word_index, keep),
        )

    def _token_loss(self, logits, labels, keep, prompt_index, mask) -> torch.Tensor:
        """Cross-entropy over real tokens. `labels` (B, T) are aligned to the real tokens;
        they are scattered back to the full row so that a causal LM's shift pairs each
        position with the *next token of the row*, virtual slots included (those targets
        are ignored). `mask` is the attention mask of the row the base model ran on."""
        if self._disabled:
            full = labels
        else:
            full = torch.full(prompt_index.shape, -100, dtype=labels.dtype, device=labels.device)
            full.scatter_(1, keep, labels)
        if self.spec.kind is ModelKind.CAUSAL:
            # A target right after a pad has no real context (left padding): its logits are
            # the pad's, so it is not scored; a row's loss must not depend on its batch.
            logits, full = logits[:, :-1], full[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), full.reshape(-1), ignore_index=-100)

    def _encode_seq2seq(self, input_ids, attention_mask, prompt_index) -> BaseModelOutput:
        """Run the encoder of an encoder-decoder with the input prompt or its deep prefix."""
        embeds, mask, prefix, dtype, B = self._inputs(input_ids, attention_mask, prompt_index)
        encoder = self.base.get_encoder()
        if prefix is None:
            return encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        cache = inject.encoder_prefix_cache(prefix, self.spec, B, dtype)
        with inject.encoder_prefix_hooks(encoder, self.spec, cache):
            return encoder(
                inputs_embeds=embeds, attention_mask=inject.prefix_mask(mask, self.num_virtual_tokens), return_dict=True
            )

    def _decoder_cache(self, B: int):
        if self._disabled or not self.deep:
            return None
        dtype = self.base.get_input_embeddings().weight.dtype
        return inject.decoder_prefix_cache(self.prompt(), self.spec, self.base.config, B, dtype)

    def _forward_seq2seq(self, input_ids, attention_mask, prompt_index, keep, answer_index,
                         field_index, word_index, labels, decoder_input_ids) -> SoftPromptOutput:
        encoded = self._encode_seq2seq(input_ids, attention_mask, prompt_index)
        enc_mask = inject.gather_tokens(attention_mask, keep) if self._disabled else attention_mask
        if decoder_input_ids is None:
            if labels is None:
                raise EncodingError("an encoder-decoder forward needs decoder_input_ids or labels")
            decoder_input_ids = self.base.prepare_decoder_input_ids_from_labels(labels=labels)
        out = self.base(
            encoder_outputs=encoded,
            attention_mask=enc_mask,
            decoder_input_ids=decoder_input_ids,
            past_key_values=self._decoder_cache(input_ids.shape[0]),
            labels=labels,
            use_cache=False,
            return_dict=True,
        )
        align = (lambda x: x) if self._disabled else (lambda x: inject.gather_tokens(x, keep))
        return SoftPromptOutput(
            loss=out.loss,
            logits=out.logits,
            last_hidden_state=align(encoded.last_hidden_state),
            attention_mask=inject.gather_tokens(attention_mask, keep),
            field_index=None if field_index is None else inject.gather_tokens(field_index, keep),
            word_index=None if word_index is None else inject.gather_tokens(word_index, keep),
        )

    # -- generation (generation.py does the work) ----------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_index: torch.Tensor | None = None,
        answer_index: torch.Tensor | None = None,
        field_index: torch.Tensor | None = None,
        word_index: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate with transformers' `generate()` and its KV cache.

        Args:
            input_ids, attention_mask, prompt_index: (B, S) from `encode`; causal LMs
                continue after the last token of each row (left padding).
            **generate_kwargs: passed to `generate` (``max_new_tokens``, ``do_sample``,
                ``temperature``, ``top_p``, ...).

        Returns:
            (B, N) the new tokens only (pads after a row's end-of-sequence).
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, prompt_index, **generate_kwargs)

    # -- persistence (io.py does the work) ------------------------------------
    def save_pretrained(self, directory, *, save_trainable: bool = True, metadata: Mapping[str, Any] | None = None,
                        **extra) -> None:
        """Write the prompt to `directory` atomically: ``prompt_config.json`` and
        ``prompt.safetensors`` (the collapsed tensor), plus ``trainable.safetensors`` (the
        full trainable state, to resume training) unless `save_trainable` is False.
        ``extra_tensors`` / ``extra_json`` add files to the same write (see `io.save_prompt`)."""
        from .io import save_prompt

        save_prompt(self, directory, save_trainable=save_trainable, metadata=metadata, **extra)

    @classmethod
    def from_pretrained(cls, base: nn.Module, directory, tokenizer=None, *, trainable: bool = False) -> "SoftPromptModel":
        """Load a saved prompt onto `base`.

        Args:
            trainable: restore the training-time module (encoder / projection) to go on
                training; otherwise the collapsed tensor is loaded as a plain table.

        Raises:
            PromptFileError: missing, corrupt or unknown-version files.
            BaseModelMismatchError: the prompt was saved for another base model.
        """
        from .io import load_prompt

        return load_prompt(cls, base, directory, tokenizer, trainable=trainable)
