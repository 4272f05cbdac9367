"""Text around token-level generation: the one parser of generation options, and
generated tokens turned into text (detokenised as they arrive, cut at stop strings,
streamed piece by piece).

    options = GenerationOptions.parse({"max_new_tokens": 32, "temperature": 0.7, "stop": "\\n"})
    text = RowText(tokenizer, eos=None, stops=options.stop, stream=stream)
    for token in new_tokens: text.add(token)     # text.text, text.stopped, text.done

The engine works on tokens; it hands each generating row's tokens to a `RowText`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..errors import SoftPromptError
from .decode import Sampling

#: generation options a request may set (transformers `generate` names), and `stop`.
GENERATE_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "stop")
#: what a generating task's `generate_options` may set besides (its own end-of-sequence).
TASK_OPTIONS = GENERATE_OPTIONS + ("eos_token_id",)

_TYPES: dict[str, Callable[[Any], Any]] = {"max_new_tokens": int, "do_sample": bool, "temperature": float,
                                           "top_p": float, "top_k": int, "seed": int, "eos_token_id": int}


@dataclass(frozen=True)
class GenerationOptions:
    """One request's generation settings; None: not set (the decoder's default). Equal
    options compare (and hash) equal: static batches group rows by them."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_id: int | None = None  # a generating task's own end of sequence

    @classmethod
    def parse(cls, options: Mapping[str, Any] | GenerationOptions, *,
              known: tuple[str, ...] = GENERATE_OPTIONS) -> "GenerationOptions":
        """Options by their transformers names (`GENERATE_OPTIONS`); ``stop`` a string or a
        list of strings (empty ones ignored); a None value is not set.

        Raises:
            SoftPromptError: an option not in `known`, or a value of the wrong type.
        """
        if isinstance(options, GenerationOptions):
            return options
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SoftPromptError(f"unknown generation option(s) {unknown}; known: {list(GENERATE_OPTIONS)}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            if value is None:
                continue
            if name == "stop":
                values["stop"] = (value,) if isinstance(value, str) else tuple(s for s in value if s)
                continue
            try:
                values[name] = _TYPES[name](value)
            except (TypeError, ValueError):
                raise SoftPromptError(f"generation option {name}: {value!r} is not a {_TYPES[name].__name__}") from None
        return cls(**values)

    @classmethod
    def completion(cls, max_tokens: int, temperature: float, top_p: float, stop: str | list[str] | None,
                   seed: int | None) -> "GenerationOptions":
        """The options of an OpenAI-style completion request (top_p 1.0, or any top_p with
        greedy decoding at temperature 0, is no nucleus filter at all)."""
        return cls.parse({"max_new_tokens": max_tokens, "temperature": temperature,
                          "top_p": None if temperature == 0 or top_p == 1.0 else top_p, "stop": stop, "seed": seed})

    @property
    def sampled(self) -> bool:
        """Sampling, not greedy: asked for, or implied by a temperature above 0."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature is not None and self.temperature > 0

    def sampling(self, eos: int | None) -> Sampling:
        """The decoder's per-row settings (`eos`: the tokenizer's, unless the task has its own)."""
        eos = self.eos_token_id if self.eos_token_id is not None else eos
        return Sampling(max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else 16,
                        do_sample=self.sampled, temperature=self.temperature or 1.0, top_k=self.top_k or 0,
                        top_p=self.top_p or 1.0, eos_token_id=eos)

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers `generate()` keyword arguments: the options set (temperature 0 means
        greedy, which `generate` spells without a temperature)."""
        kwargs = {name: getattr(self, name) for name in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                                         "top_k", "eos_token_id") if getattr(self, name) is not None}
        if self.temperature is not None:
            kwargs["do_sample"] = self.sampled
        if self.temperature == 0:
            kwargs.pop("temperature")
        return kwargs

    def seed_rng(self) -> None:
        """Seed torch's generator, when the request gives a seed (reproducible sampling)."""
        if self.seed is not None:
            torch.manual_seed(self.seed)


class TokenStream:
    """A generating request's text as it is produced: `on_text` receives each new piece
    (called from the engine's thread); `cancel()` (a client gone) stops the row at the
    next step."""

    def __init__(self, on_text: Callable[[str], None]):
        self.on_text = on_text
        self.emitted = False  # a piece went out: the row cannot be run again from the start
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class RowText:
    """One generating row's text: decoded as tokens arrive, cut at its end-of-sequence token
    or a stop string, handed piece by piece to its stream.

    Args:
        eos: the token that ends the row here (None: the decoder ends it).
        decode: a generating task's own decoding of (1, N) tokens (its eos, stripped);
            default: the tokenizer's, special tokens skipped.
    """

    def __init__(self, tokenizer, eos: int | None, stops: tuple[str, ...] | list[str], stream: TokenStream | None,
                 decode: Callable[[Any, torch.Tensor], list[str]] | None = None):
        self.tokenizer, self.eos, self.stops, self.stream, self.decode = tokenizer, eos, list(stops), stream, decode
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # end of sequence or a stop string

    @property
    def done(self) -> bool:
        return self.stopped or (self.stream is not None and self.stream.cancelled)

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, token: int) -> bool:
        """Take the row's next token; returns whether the row is done."""
        if self.done:
            return True
        if self.eos is not None and token == self.eos:
            self.stopped = True
            return True
        self.ids.append(token)
        self._update()
        return self.done

    def _update(self) -> None:
        if self.decode is not None:
            text = self.decode(self.tokenizer, torch.tensor([self.ids]))[0]
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            if s in text:
                text, self.stopped = text[: text.index(s)], True
        if text.startswith(self.text) and len(text) > len(self.text) and not text.endswith("\ufffd"):
            piece, self.text = text[len(self.text):], text  # a piece: wait for whole characters
            if self.stream is not None and not self.stream.cancelled:
                self.stream.emitted = True
                self.stream.on_text(piece)
        elif not text.startswith(self.text):  # re-tokenised text changed earlier characters: keep the new
            self.text = text

    def finish(self, tokens: list[int]) -> None:
        """After generate(): the same tokens (a row that never streamed) decoded at once."""
        if not self.ids and not self.stopped:
            for t in tokens:
                if self.add(t):
                    break


class Streamer(BaseStreamer):
    """generate()'s streamer for a batch: the first call is the prompt, then one (B,)
    tensor of new tokens a step, handed to each row."""

    def __init__(self, rows: list[RowText]):
        self.rows = rows
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt (or the decoder's start tokens)
            self.first = False
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            row.add(int(token))

    def end(self) -> None:
        pass


class StopRows(StoppingCriteria):
    """Per-row stop: a stop string was produced, or the row's client went away."""

    def __init__(self, rows: list[RowText]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


__all__ = ["GENERATE_OPTIONS", "GenerationOptions", "TokenStream", "RowText", "Streamer", "StopRows"]
