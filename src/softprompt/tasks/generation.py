"""Generation (causal LMs and encoder-decoders): loss on the target tokens only; greedy
decoding scored by exact match and token F1."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..architecture import ModelKind
from ..errors import ConfigError, EncodingError, UnsupportedModelError
from ..transfer import to_device
from .base import Task
from .metrics import generation_metrics


def _first_int(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


class Generation(Task):
    """Text to text: ``{<template fields>..., "target": str}``.

    Training (teacher forcing, loss on the target tokens only):

    * causal LM: each row is the encoded input (left padded, cut at [MASK] if the
      template has one) with the target's tokens and an end-of-sequence token appended
      as real tokens; ``labels`` are -100 everywhere but on those appended tokens, and
      `SoftPromptModel.forward` shifts them (the output at token t predicts token t+1).
      The target is tokenized after a word boundary (``" Paris"``), as it follows the
      input's last word.
    * encoder-decoder: ``labels`` are the target ids plus end-of-sequence, -100 padded;
      the model shifts them right into ``decoder_input_ids``.

    The loss is the mean cross-entropy over all target tokens of the batch (token
    level, as transformers computes it). The end-of-sequence id is the one `generate`
    stops on (the base model's generation config, else its config, else the tokenizer's),
    so a trained prompt learns to stop.

    Prediction: greedy ``model.generate(max_new_tokens=..., do_sample=False)``, cut at
    the first end-of-sequence, decoded with ``skip_special_tokens`` and stripped.

    Args:
        max_new_tokens: most tokens generated per row.
        target_field: the example field holding the target text.
        max_length: most input tokens per row (virtual slots included); inputs are also
            shortened so that input + target (training) or input + max_new_tokens
            (prediction) fit a causal LM's positions.
        max_target_length: most target tokens (end-of-sequence included); longer
            targets are cut.
    """

    kind = "generation"
    metric = "token_f1"
    generates = True
    answer_only = True
    endpoint = "completions"

    def __init__(self, max_new_tokens: int = 32, target_field: str = "target", max_length: int | None = None,
                 max_target_length: int | None = None):
        super().__init__()
        for name, value in (("max_new_tokens", max_new_tokens), ("max_length", max_length),
                            ("max_target_length", max_target_length)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.max_new_tokens = max_new_tokens
        self.target_field = target_field
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.eos_id: int | None = None
        self._bound = False

    def bind(self, model) -> None:
        name = type(model.base).__name__
        if model.spec.kind is ModelKind.ENCODER:
            raise UnsupportedModelError(f"generation needs a causal LM or an encoder-decoder; {name} is an encoder")
        if not hasattr(model.base, "generate") or model.base.get_output_embeddings() is None:
            raise UnsupportedModelError(f"generation needs a model with an LM head; {name} has none")
        if model.encoder is None:
            raise ConfigError("generation needs the model's tokenizer: pass tokenizer=... to SoftPromptModel")
        if model.spec.kind is ModelKind.CAUSAL and model.prompt.input_delta() is not None:
            # teacher forcing puts the target in the row, where the delta would reach its tokens;
            # generated tokens are outside the row and get none: training would not match decoding
            raise ConfigError(f"{model.config.method} on a causal LM's generation task: its input delta covers the "
                              "row's real tokens, which in training include the appended target and in generation "
                              "do not; use DePT with a head or an answer slot (classification, verbalizer, NER) "
                              "or on an encoder-decoder, or another method for generation")
        gen = getattr(model.base, "generation_config", None)
        eos = _first_int(getattr(gen, "eos_token_id", None)) if gen is not None else None
        if eos is None:
            eos = _first_int(getattr(model.base.config, "eos_token_id", None))
        if eos is None:
            eos = model.tokenizer.eos_token_id
        self.eos_id = eos
        self._bound = True

    def _require_bound(self) -> None:
        if not self._bound:
            raise ConfigError("the generation task is not bound to a model: call task.bind(model) first")

    # -- data -----------------------------------------------------------------
    def target_ids(self, model, example: Mapping[str, Any], index: int) -> list[int]:
        """Token ids of the example's target, end-of-sequence included."""
        if self.target_field not in example:
            raise EncodingError(f"example {index} has no {self.target_field!r} field (the target text)")
        target = example[self.target_field]
        if not isinstance(target, str):
            raise EncodingError(f"example {index}: {self.target_field!r} must be a string, got {type(target).__name__}")
        causal = model.spec.kind is ModelKind.CAUSAL
        ids = model.encoder.tokenize(target, space_before=causal, data=True)
        if self.eos_id is not None:
            ids = ids + [self.eos_id]
        if self.max_target_length is not None:
            ids = ids[: self.max_target_length]
        if not ids:
            raise EncodingError(f"example {index}: the target {target!r} is empty and the model has no end-of-sequence token")
        return ids

    def _encode_inputs(self, model, examples, room: list[int]):
        """Inputs, each shortened to leave `room[i]` positions after it (causal LMs)."""
        limit = model.encoder.max_length
        rows = []
        for i, (example, extra) in enumerate(zip(examples, room)):
            max_length = self.max_length
            if limit is not None and model.spec.kind is ModelKind.CAUSAL:
                fit = limit - extra
                if fit < 1:
                    raise EncodingError(f"example {i}: {extra} target/new tokens leave no room for the input "
                                        f"in the model's {limit} positions")
                max_length = fit if max_length is None else min(max_length, fit)
            rows.append(model.encoder.encode(example, max_length=max_length, index=i))
        return model.encoder.collate(rows, model.padding_side).to(model.device)

    def collate(self, model, examples, *, with_targets=True):
        """Without targets: the encoded inputs (what `predict` takes). With targets, for a
        causal LM the batch holds the inputs *with the targets appended* (train on it,
        do not `predict` from it) and ``targets["labels"]`` (B, T) is aligned to its real
        tokens; for an encoder-decoder ``targets["labels"]`` is (B, L) decoder targets."""
        self._require_bound()
        examples = list(examples)
        causal = model.spec.kind is ModelKind.CAUSAL
        if not with_targets:
            return self._encode_inputs(model, examples, [self.max_new_tokens] * len(examples)), {}
        target_ids = [self.target_ids(model, e, i) for i, e in enumerate(examples)]
        if not causal:
            batch = self._encode_inputs(model, examples, [0] * len(examples))
            L = max(len(t) for t in target_ids)
            labels = torch.full((len(examples), L), -100, dtype=torch.long)
            for i, t in enumerate(target_ids):
                labels[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            return batch, {"labels": to_device(labels, model.device)}
        inputs = self._encode_inputs(model, examples, [len(t) for t in target_ids])
        rows = torch.arange(len(examples), device=model.device)
        batch, positions = inputs.append_tokens(rows, target_ids, pad_id=model.encoder.pad_id,
                                                padding_side=model.padding_side)  # positions: (B, L) target columns
        S = batch["input_ids"].shape[1]
        present = positions >= 0
        columns = torch.where(present, positions, S)  # absent entries go to a dump column S
        values = batch["input_ids"].gather(1, positions.clamp(min=0)).masked_fill(~present, -100)
        full = torch.full((len(examples), S + 1), -100, dtype=torch.long, device=model.device)
        full = full.scatter(1, columns, values)[:, :S]  # (B, S) the target ids at their columns
        return batch, {"labels": batch.align_to_real_tokens(full)}

    # -- model ----------------------------------------------------------------
    def loss(self, model, batch, targets):
        # a causal LM scores only the target columns, a chunk at a time (`loss.chunked_token_loss`)
        causal = model.spec.kind is ModelKind.CAUSAL
        return model(**batch, labels=targets["labels"], logits="none" if causal else "all").loss

    def generate_options(self) -> dict[str, Any]:
        """The `generate` keyword arguments of `predict` (greedy, up to max_new_tokens)."""
        self._require_bound()
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        if self.eos_id is not None:
            kwargs["eos_token_id"] = self.eos_id
        return kwargs

    @torch.no_grad()
    def predict(self, model, batch, out=None):
        """The generated text of each row (`out`: (B, N) new tokens already generated with
        `generate_options`, e.g. in a mixed-task batch)."""
        new = model.generate(**batch, **self.generate_options()) if out is None else out  # (B, N) new tokens
        return self.decode(model.tokenizer, new)

    def decode(self, tokenizer, new: torch.Tensor) -> list[str]:
        """(B, N) new tokens -> texts, each cut at its end-of-sequence token."""
        texts = []
        for row in new.tolist():
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def reference(self, example):
        return str(example[self.target_field])

    def metrics(self, predictions, references):
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        return generation_metrics(predictions, references)

    def to_config(self):
        return {"kind": self.kind, "max_new_tokens": self.max_new_tokens, "target_field": self.target_field,
                "max_length": self.max_length, "max_target_length": self.max_target_length}

    @classmethod
    def from_config(cls, config):
        return cls(max_new_tokens=config.get("max_new_tokens", 32), target_field=config.get("target_field", "target"),
                   max_length=config.get("max_length"), max_target_length=config.get("max_target_length"))
