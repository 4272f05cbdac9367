"""SoftPromptModel: one frozen base model and one trainable soft prompt.

The model branches only on *input* versus *deep* prompts (inject.py does the rest), and
on the model kind: causal LM, encoder, or encoder-decoder.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import forward, inject, regions
# OnBase lives in architecture.py (serve's PlainBase shares it); still importable from here
from .architecture import (ModelKind, ModelSpec, OnBase, base_identity, forward_accepts, model_spec,
                           tensor_parallel_mesh, whole_tensor)
from .batch import PromptBatch
from .encode import TemplateEncoder
from .errors import ConfigError, UnsupportedModelError
from .forward import SoftPromptOutput
from .inject import Prompts
from .io.hub import push_prompt_folder, resolve_prompt_source
from .io.prompt import load_prompt, save_prompt, transferred_prompt
from .methods import PromptConfig, PromptModule, build_module
from .methods.prefix_tuning import text_prefix
from .peft_layout import batch_from_ids, refuse_encode_fields, refuse_segments


class SoftPromptModel(OnBase, nn.Module):
    """A frozen transformers model with one soft prompt.

    Args:
        base: any transformers model of a supported family (causal LM, BERT-style
            encoder, T5/BART encoder-decoder), with or without a task head. Its
            parameters are frozen (``requires_grad=False``) and never modified.
        config: a method config (`PromptTuningConfig`, `PTuningConfig`,
            `PrefixTuningConfig`, `PTuningV2Config`, `DePTConfig`).
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
        if self.deep and self.spec.kind is ModelKind.ENCODER and not forward_accepts(base, inject.CACHE_ARG):
            raise UnsupportedModelError(
                f"{type(base).__name__} takes no cache (past_key_values): a deep prompt cannot be injected into it"
            )
        if self.deep and self.spec.kind is ModelKind.SEQ2SEQ and self.spec.encoder_self_attention is None:
            raise UnsupportedModelError(
                f"{type(base).__name__} ({self.spec.model_type}): a deep prompt cannot be injected into its encoder; "
                f"supported encoder-decoder families: t5, mt5, bart, mbart"
            )
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.get_input_embeddings().weight
        # a tensor-parallel base's embedding is gathered (a collective) only to build a prompt:
        # a given one (a folder read by a server, on one process alone) gathers nothing
        self.prompt = prompt if prompt is not None else build_module(
            config, self.num_virtual_tokens, self.spec, whole_tensor(weight), tokenizer
        )
        if prompt is None and getattr(config, "init", None) == "text" and self.deep:  # the base's own K/V of a text
            self.prompt.start_from(text_prefix(base, tokenizer, self.spec, config.init_text, self.num_virtual_tokens))
        if prompt is None and getattr(config, "init", None) == "prompt":  # another prompt of this base (transfer)
            self.prompt.start_from(transferred_prompt(config.init_prompt, base, deep=self.deep,
                                                      P=self.num_virtual_tokens))
        self.prompt.to(weight.device)
        self.encoder = (
            TemplateEncoder(self.template, tokenizer, self.spec, self.num_virtual_tokens if self.deep else 0)
            if tokenizer is not None
            else None
        )
        # Most tokens per row when `encode` is given no max_length (None: the model's own
        # limit); `softprompt train` sets it from the run's ``max_length``.
        self.max_length: int | None = None
        self._disabled = False
        # A training-time view of the base (compiled / checkpointed blocks, see regions.py),
        # kept out of the module tree: it shares the base's parameters.
        self.__dict__["_train_base"] = None
        self.__dict__["_train_lm_loss"] = "chunks"  # `accelerated`'s
        # A base split by tensor parallelism is identified here, by every process at once: its
        # fingerprint gathers the embedding, a collective that one process saving alone would wait on.
        self.__dict__["_identity"] = base_identity(base, self.spec) if tensor_parallel_mesh(base) is not None else None

    # -- identity -------------------------------------------------------------
    @property
    def identity(self):
        return self.__dict__["_identity"] or base_identity(self.base, self.spec)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters: the prompt's against the prompt's and the frozen
        base's together (PEFT's method of the same name; a task head is counted apart)."""
        return self.trainable_parameters(), sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the trainable parameters as PEFT does:
        ``trainable params: 15,360 || all params: 124,455,168 || trainable%: 0.0123``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

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
            max_length: most tokens per row, virtual slots included (default: the
                model's `max_length` attribute, then the base model's limit).

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
        max_length = self.max_length if max_length is None else max_length
        rows = [self.encoder.encode(ex, max_length=max_length, index=i) for i, ex in enumerate(examples)]
        return self.encoder.collate(rows, side).to(self.device)

    def batch_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PromptBatch:
        """The batch `encode` gives for texts, from the texts' token ids (a tokenizer's output,
        as a PEFT model takes them): for templates of virtual tokens then the text alone
        (``[P:n] {text}``, ``[P:n] [START] {text}``; ``{text}`` for a deep prompt), the P
        virtual slots put in front of each row's text (after its leading special tokens
        unless the template has ``[START]``) and attended. `forward` and `generate` call it
        for a batch given without ``prompt_index``.

        Args:
            input_ids: (B, S) token ids, padded on either side, the tokenizer's special tokens included.
            attention_mask: (B, S) 1 at tokens, 0 at pads (default: all tokens).

        Returns:
            A `PromptBatch` of (B, S + P) tensors; its real tokens are the S columns of
            `input_ids`, so outputs (and labels) aligned to the real tokens line up with them.

        Raises:
            EncodingError: a template whose rows hold more than virtual tokens then the text
                (build those batches with `encode`), or input ids that do not fit the layout.
        """
        lead = None if self.encoder is None else self.encoder.lead
        pad_id = 0 if self.encoder is None else self.encoder.pad_id
        return batch_from_ids(self.template, self.spec, input_ids, attention_mask, lead=lead, pad_id=pad_id,
                              prefix_length=self.num_virtual_tokens if self.deep else 0)

    # -- the prompt -----------------------------------------------------------
    @contextmanager
    def disable_prompt(self) -> Iterator[None]:
        """Within the block, the model behaves as the bare base model on the real tokens."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @contextmanager
    def accelerated(self, *, compile: bool = False, checkpointing: bool = False,
                    compile_options: dict[str, Any] | None = None, lm_loss: str = "chunks",
                    float8: bool = False) -> Iterator[None]:
        """Within the block, training forwards (``model.train()``, grad on) run the base
        through a view with its repeated blocks compiled and/or checkpointed (regions.py),
        and compute a causal LM's token loss with the kernel `lm_loss`; evaluation and
        generation keep the base as it is. The base is never modified.

        Args:
            compile: `torch.compile` each block (regional compilation).
            checkpointing: activation checkpointing of each block (deep prompts included).
            compile_options: keyword arguments of `torch.compile`.
            lm_loss: one of `loss.LM_LOSSES` (``chunks``: what every other forward uses).
            float8: the blocks' frozen linear layers run their products in FP8
                (`float8.Float8Frozen`).

        With `compile`, dynamo's recompile limit is raised for the block (a deep prompt
        compiles one graph per layer, see `regions.recompile_limit`) and restored after.
        """
        if checkpointing and self.deep and self.spec.sliding_window_layers:
            raise ConfigError(f"{self.spec.model_type}: activation checkpointing with a deep prompt is not supported "
                              "for families with sliding-window layers")
        if checkpointing and self.deep and self.spec.kind is ModelKind.SEQ2SEQ:
            # The encoder receives its prefix through hooks that live for one forward call;
            # the recomputation of a checkpointed encoder block runs later, in the backward pass.
            raise ConfigError(f"{self.spec.model_type}: activation checkpointing with a deep prompt is not supported "
                              "for encoder-decoders")
        base_view = regions.view(self.base, compile=compile, checkpointing=checkpointing,
                                 compile_options=compile_options, float8=float8)
        previous = self._train_base, self._train_lm_loss
        self.__dict__["_train_base"], self.__dict__["_train_lm_loss"] = base_view, lm_loss
        dynamo = torch._dynamo.config
        limit = dynamo.recompile_limit
        if compile:
            dynamo.recompile_limit = max(limit, regions.recompile_limit(self.base))
        try:
            yield
        finally:
            self.__dict__["_train_base"], self.__dict__["_train_lm_loss"] = previous
            dynamo.recompile_limit = limit

    def _training_forward(self) -> bool:
        return self._train_base is not None and self.training and torch.is_grad_enabled()

    def _running_base(self) -> nn.Module:
        return self._train_base if self._training_forward() else self.base

    def export(self) -> torch.Tensor:
        """The collapsed inference tensor: (P, D) for input methods, (L, 2, H_kv, P, D_head) for deep ones."""
        return self.prompt.export()

    def export_input_delta(self) -> torch.Tensor | None:
        """The collapsed additive input delta (S_max, D) of a DePT prompt; None for the other methods."""
        return self.prompt.export_input_delta()

    # -- forward --------------------------------------------------------------
    def prompts(self) -> Prompts:
        """This model's prompt for a forward (training-time module: encoder / projection run
        once per call, for the whole batch)."""
        if self.deep:
            return Prompts(prefix=self.prompt())  # (L, 2, H_kv, P, D_head)
        return Prompts(tables=self.prompt(), input_delta=self.prompt.input_delta())  # (P, D), (S_max, D) or None

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
        token_type_ids: torch.Tensor | None = None,
        pack_index: torch.Tensor | None = None,
    ) -> SoftPromptOutput:
        """Run the base model with the prompt.

        Args:
            input_ids: (B, S) from `encode` (virtual slots hold a pad id); or, without
                `prompt_index`, a tokenizer's ids as a PEFT model takes them, for templates
                of virtual tokens then the text (`batch_from_ids` adds the slots).
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
                ``"all"``, or ``"none"`` for a causal LM: its loss is then computed from
                the last-layer states a chunk of target positions at a time, with no
                (B, S, V) logits (`loss.chunked_token_loss`).
            token_type_ids: (B, S) what a BERT-style tokenizer returns beside the ids, so that
                ``model(**tokenizer(texts, ...))`` works: all 0 (one segment, as every
                template's row), else refused.
            pack_index: (N, W) run the rows packed into N sequences without padding
                (`packing.pack_index`; a training batch's, ``train.packing``): the same
                outputs and loss as the padded batch.

        Returns:
            `SoftPromptOutput`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        refuse_segments(token_type_ids)
        if prompt_index is None:
            refuse_encode_fields(answer_index=answer_index, field_index=field_index, word_index=word_index)
            input_ids, attention_mask, prompt_index = self._slots_added(input_ids, attention_mask)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, prompt_index=prompt_index,
                     answer_index=answer_index, field_index=field_index, word_index=word_index)
        virtual = None
        if self._disabled:
            batch, prompts = forward.drop_virtual_slots(batch), Prompts()
            pack_index = None  # its layout was the rows with their slots: the bare base runs them padded
        else:
            virtual = None if self.deep else self.num_virtual_tokens  # checked in forward.run
            prompts = self.prompts()
        return forward.run(self._running_base(), self.spec, batch["input_ids"], batch["attention_mask"], batch["prompt_index"],
                           prompts, answer_index=batch.get("answer_index"), field_index=batch.get("field_index"),
                           word_index=batch.get("word_index"), labels=labels, decoder_input_ids=decoder_input_ids,
                           output_hidden_states=output_hidden_states, logits=logits,
                           lm_head_columns=self.keeps_logits, virtual_tokens=virtual, pack_index=pack_index,
                           lm_loss=self._train_lm_loss if self._training_forward() else "chunks")

    def _slots_added(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(input_ids, attention_mask, prompt_index) of a batch given without prompt_index:
        a tokenizer's ids with the virtual slots added (`batch_from_ids`); with the prompt
        disabled, the ids as they are (the bare base reads the same tokens whatever the template)."""
        if self._disabled:
            return input_ids, attention_mask, torch.full_like(input_ids, -1)
        batch = self.batch_from_ids(input_ids, attention_mask)
        return batch.input_ids, batch.attention_mask, batch.prompt_index

    # -- generation ------------------------------------------------------------
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
                continue after the last token of each row (left padding). Without
                `prompt_index`, a tokenizer's ids, as for `forward`.
            **generate_kwargs: passed to `generate` (``max_new_tokens``, ``do_sample``,
                ``temperature``, ``top_p``, ...).

        Returns:
            (B, N) the new tokens only (pads after a row's end-of-sequence).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        refuse_segments(generate_kwargs.pop("token_type_ids", None))
        if prompt_index is None:
            refuse_encode_fields(answer_index=answer_index, field_index=field_index, word_index=word_index)
            input_ids, attention_mask, prompt_index = self._slots_added(input_ids, attention_mask)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, prompt_index=prompt_index)
        if self._disabled:
            batch, prompts = forward.drop_virtual_slots(batch), Prompts()
        else:
            prompts = self.prompts()
        pad_id = self.encoder.pad_id if self.encoder is not None else 0
        return forward.generate(self.base, self.spec, batch["input_ids"], batch["attention_mask"], batch["prompt_index"],
                                prompts, pad_id, **generate_kwargs)

    # -- persistence (io/prompt.py and io/hub.py do the work) -------------------
    def save_pretrained(self, directory, *, save_trainable: bool = True, metadata: Mapping[str, Any] | None = None,
                        push_to_hub: bool = False, repo_id: str | None = None, private: bool = True,
                        token: str | None = None, commit_message: str | None = None, **extra) -> str | None:
        """Write the prompt to `directory` atomically: ``prompt_config.json`` and
        ``prompt.safetensors`` (the collapsed tensor), plus ``trainable.safetensors`` (the
        full trainable state, to resume training) unless `save_trainable` is False.
        ``extra_tensors`` / ``extra_json`` add files to the same write; ``dtype="bfloat16"``
        stores the collapsed tensor in half the bytes (see `io.prompt.save_prompt`).

        Args:
            push_to_hub: then upload the folder to the Hugging Face Hub (`push_to_hub`).
            repo_id: where to: ``user/repo[@branch][:subdir]`` (default: the folder's name,
                under the token's user, as transformers does).
            private, token, commit_message: as for `push_to_hub`.

        Returns:
            The commit's URL when pushed, else None.
        """
        save_prompt(self, directory, save_trainable=save_trainable, metadata=metadata, **extra)
        if push_to_hub:
            return push_prompt_folder(directory, repo_id or Path(directory).resolve().name, private=private,
                                      token=token, commit_message=commit_message)
        return None

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None,
                    commit_message: str | None = None, **save_kwargs) -> str:
        """Save the prompt folder (model card included) and upload it to the Hugging Face Hub
        as one commit (`io.hub.push_prompt_folder`); `from_pretrained(base, repo_id)` loads it.

        Args:
            repo_id: ``user/repo`` (or ``repo``, under the token's user), optionally with
                ``@branch`` and ``:subdir`` (several prompts in one repository).
            private: create the repository private (an existing one keeps its visibility).
            token: a token with write access (default: ``HF_TOKEN`` or the stored login).
            **save_kwargs: as for `save_pretrained` (``metadata``, ``extra_json``, ...).

        Returns:
            The URL of the commit.

        Raises:
            ConfigError: the Hub refused the push (the reason named).
        """
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "prompt"
            self.save_pretrained(folder, **save_kwargs)
            return push_prompt_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, base: nn.Module, directory, tokenizer=None, *, trainable: bool = False,
                        revision: str | None = None, token: str | None = None) -> "SoftPromptModel":
        """Load a saved prompt onto `base`.

        Args:
            directory: a prompt folder, or a Hugging Face Hub location
                ``user/repo[@revision][:subdir]`` (fetched into the Hub cache; a local folder
                of that name wins; ``HF_HUB_OFFLINE=1`` loads from the cache alone).
            trainable: restore the training-time module (encoder / projection) to go on
                training; otherwise the collapsed tensor is loaded as a plain table.
            revision, token: for a Hub location: the revision when it names none, and a
                token for a private repository.

        Raises:
            PromptFileError: missing, corrupt or unknown-version files; a Hub location that
                cannot be fetched (named in the message).
            BaseModelMismatchError: the prompt was saved for another base model.
        """
        directory = resolve_prompt_source(directory, revision=revision, token=token)
        return load_prompt(cls, base, directory, tokenizer, trainable=trainable)

