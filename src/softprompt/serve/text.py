"""Text around token-level generation: the one parser of generation options, and
generated tokens turned into text (detokenised as they arrive, cut at stop strings,
streamed piece by piece).

    options = GenerationOptions.parse({"max_new_tokens": 32, "temperature": 0.7, "stop": "\\n"})
    text = RowText(tokenizer, eos=None, stops=options.stop, stream=stream)
    for token in new_tokens: text.add(token)     # text.text, text.stopped, text.done

The engine works on tokens; it hands each generating row's tokens to a `RowText`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..errors import SoftPromptError
from .sampling import Sampling, TokenLogprob, fresh_seed

#: generation options a request may set (transformers `generate` names), and `stop`.
GENERATE_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "stop", "logprobs",
                    "presence_penalty", "frequency_penalty", "logit_bias")
#: what a generating task's `generate_options` may set besides (its own end-of-sequence).
TASK_OPTIONS = GENERATE_OPTIONS + ("eos_token_id",)

#: counts (tokens, top-k, token ids) stay int32, whatever tensor or buffer they size
INT32_MAX = 2**31 - 1
#: a seed is 64 bits, signed or not (torch.manual_seed's range); a negative one is taken mod 2**64
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Temperatures between 0 (greedy) and this are refused. Sampling divides fp32 logits by T:
#: a T of 1e-45 (an fp32 subnormal) sends every logit to +-inf and softmax to NaN. From 1e-3
#: up, logits / T stays finite for every |logit| below 3.4e35 (far beyond what any model
#: produces; fp16 logits end at 65504), and softmax of finite scores is finite. Below it
#: sampling is greedy in all but name (a logit gap of 0.02 already gives odds of e**-20).
MIN_TEMPERATURE = 1e-3
#: Above this the distribution is uniform for any purpose (OpenAI stops at 2); the bound keeps T finite in fp32.
MAX_TEMPERATURE = 100.0
#: most alternatives a token's log-probabilities may list (OpenAI's chat limit; vLLM's default)
MAX_LOGPROBS = 20
#: OpenAI's ranges: penalties -2 .. 2, a logit bias -100 .. 100 on at most this many tokens
MAX_PENALTY, MAX_BIAS, MAX_BIASED_TOKENS = 2.0, 100.0, 300
#: stop strings: at most this many (OpenAI's limit), each at most this long (checked against the text every token)
MAX_STOPS, MAX_STOP_CHARS = 4, 256


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """An integer option: an int, a float with an integral value (7.0, as JSON may send it)
    or a string of digits; bools are not integers."""
    allowed = f"an integer from {low} to {high}"
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError
            number = int(value)
        else:
            number = int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise SoftPromptError(f"generation option {name}: {_show(value)} is not {allowed}") from None
    if not low <= number <= high:
        raise SoftPromptError(f"generation option {name}: {_show(value)} is out of range: {allowed}")
    return number


def _real(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """A finite number option (NaN and infinities refused for every one) that passes `ok`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past the float range
        raise SoftPromptError(f"generation option {name}: {_show(value)} is not a number: {allowed}") from None
    if not math.isfinite(number) or not ok(number):
        raise SoftPromptError(f"generation option {name}: {_show(value)} is out of range: {allowed}")
    return number


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SoftPromptError(f"generation option {name}: {_show(value)} is not true or false")
    return value


def _stops(value: Any) -> tuple[str, ...]:
    """A string or a list of strings. An empty stop string would match at once and end every
    text empty: ignored, alone (``""``) or in a list (``[""]``) alike."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)):
        raise SoftPromptError(f"generation option stop: {_show(value)} is not a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise SoftPromptError(f"generation option stop: {len(stops)} stop strings; at most {MAX_STOPS}")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise SoftPromptError(f"generation option stop: item {i} ({_show(s)}) is not a string")
        if len(s) > MAX_STOP_CHARS:
            raise SoftPromptError(f"generation option stop: item {i} has {len(s)} characters; "
                                  f"at most {MAX_STOP_CHARS}")
    return tuple(s for s in stops if s)


def _biases(value: Any) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` (ids as JSON keys are strings) -> ((id, bias), ...), sorted."""
    if not isinstance(value, Mapping):
        raise SoftPromptError(f"generation option logit_bias: {_show(value)} is not an object of token ids to biases")
    if len(value) > MAX_BIASED_TOKENS:
        raise SoftPromptError(f"generation option logit_bias: {len(value)} tokens; at most {MAX_BIASED_TOKENS}")
    out = {}
    for key, bias in value.items():
        token = _integer("logit_bias", key, 0, INT32_MAX)
        out[token] = _real("logit_bias", bias, f"from -{MAX_BIAS:g} to {MAX_BIAS:g} (token {key})",
                           lambda b: -MAX_BIAS <= b <= MAX_BIAS)
    return tuple(sorted(out.items()))


def _show(value: Any) -> str:
    """A value for a message, cut short (a client may send anything)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: each option's parser: the value -> the value kept, or a SoftPromptError naming the option, value and range
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "max_new_tokens": lambda v: _integer("max_new_tokens", v, 1, INT32_MAX),
    "do_sample": lambda v: _flag("do_sample", v),
    "temperature": lambda v: _real("temperature", v, f"0 (greedy) or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}; "
                                   "send 0 for greedy decoding",
                                   lambda t: t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
    "top_p": lambda v: _real("top_p", v, "above 0 and at most 1", lambda p: 0 < p <= 1),
    "top_k": lambda v: _integer("top_k", v, 0, INT32_MAX),
    "seed": lambda v: _integer("seed", v, SEED_MIN, SEED_MAX) % 2**64,
    "stop": _stops,
    "eos_token_id": lambda v: _integer("eos_token_id", v, 0, INT32_MAX),
    "logprobs": lambda v: _integer("logprobs", v, 0, MAX_LOGPROBS),
    "presence_penalty": lambda v: _real("presence_penalty", v, f"from -{MAX_PENALTY:g} to {MAX_PENALTY:g}",
                                        lambda p: -MAX_PENALTY <= p <= MAX_PENALTY),
    "frequency_penalty": lambda v: _real("frequency_penalty", v, f"from -{MAX_PENALTY:g} to {MAX_PENALTY:g}",
                                         lambda p: -MAX_PENALTY <= p <= MAX_PENALTY),
    "logit_bias": _biases,
}


@dataclass(frozen=True)
class GenerationOptions:
    """One request's generation settings; None: not set (the decoder's default). Every
    value is checked by `parse`: nothing that reaches the device can turn scores into NaN."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # 0 .. 2**64 - 1; None: fresh entropy for each row
    stop: tuple[str, ...] = ()
    eos_token_id: int | None = None  # a generating task's own end of sequence
    logprobs: int | None = None  # each new token's log-probability and the top k others' (None: not asked)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted

    @classmethod
    def parse(cls, options: Mapping[str, Any] | GenerationOptions, *,
              known: tuple[str, ...] = GENERATE_OPTIONS) -> "GenerationOptions":
        """Options by their transformers names (`GENERATE_OPTIONS`); a None value is not set.

        Ranges: ``max_new_tokens`` 1 .. 2**31-1; ``temperature`` 0 (greedy) or
        `MIN_TEMPERATURE` .. `MAX_TEMPERATURE`; ``top_p`` in (0, 1]; ``top_k`` 0 (off) ..
        2**31-1; ``logprobs`` 0 .. `MAX_LOGPROBS`; ``seed`` -2**63 .. 2**64-1 (a negative seed is taken mod 2**64, as
        torch.manual_seed does); ``do_sample`` true or false; ``stop`` a string or a list of
        at most `MAX_STOPS` strings of at most `MAX_STOP_CHARS` characters (empty ones
        ignored). Integers may come as integral floats (7.0) or digit strings, numbers as
        number strings; NaN and infinities are refused everywhere, bools are not numbers.

        Raises:
            SoftPromptError: an option not in `known`, or a value of the wrong type or out
                of its range (the message names the option, the value and the range).
        """
        if isinstance(options, GenerationOptions):
            return options
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SoftPromptError(f"unknown generation option(s) {unknown}; known: {list(GENERATE_OPTIONS)}")
        values = {name: _PARSERS[name](value) for name, value in options.items() if value is not None}
        if values.get("do_sample") and values.get("temperature") == 0:
            raise SoftPromptError("generation options do_sample: true with temperature 0 (greedy): "
                                  "send a temperature above 0 to sample")
        return cls(**values)

    @classmethod
    def completion(cls, max_tokens: int, temperature: float, top_p: float, stop: str | list[str] | None,
                   seed: int | None, logprobs: int | None = None, **more: Any) -> "GenerationOptions":
        """The options of an OpenAI-style completion request (top_p 1.0, or any top_p with
        greedy decoding at temperature 0, is no nucleus filter at all); `more`: other
        `GENERATE_OPTIONS` (the penalties, logit_bias)."""
        options = cls.parse({"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop,
                             "seed": seed, "logprobs": logprobs, **more})
        if options.temperature == 0 or options.top_p == 1.0:
            options = dataclasses.replace(options, top_p=None)
        return options

    def check_vocabulary(self, size: int) -> None:
        """Refuse a `logit_bias` token the model's scores have no column for (indexing it on a
        GPU would be a device-side error that ends every request on the device)."""
        for token, _ in self.logit_bias:
            if token >= size:
                raise SoftPromptError(f"generation option logit_bias: token {token} is not in the model's vocabulary "
                                      f"(ids 0 to {size - 1})")

    @property
    def sampled(self) -> bool:
        """Sampling, not greedy: asked for, or implied by a temperature above 0."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature is not None and self.temperature > 0

    @property
    def batch_key(self) -> tuple[int | None, int | None]:
        """What the rows of one static generation batch share (one `generate()` call): the
        token budget and the end of sequence. Sampling settings and seeds are per row
        (`sampling.RowSampler`)."""
        return self.max_new_tokens, self.eos_token_id

    def sampling(self, eos: int | None) -> Sampling:
        """One row's decoding settings (`eos`: the tokenizer's, unless the task has its own);
        without a seed, each call draws fresh entropy: rows never share a stream by chance."""
        eos = self.eos_token_id if self.eos_token_id is not None else eos
        return Sampling(max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else 16,
                        do_sample=self.sampled, temperature=self.temperature or 1.0, top_k=self.top_k or 0,
                        top_p=self.top_p or 1.0, eos_token_id=eos,
                        seed=self.seed if self.seed is not None else fresh_seed(), logprobs=self.logprobs,
                        presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                        logit_bias=self.logit_bias)

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers `generate()` keyword arguments of a static batch (`batch_key`): its
        budget and end of sequence, decoding greedy: each row's sampling is a `RowSampler`'s."""
        kwargs: dict[str, Any] = {"do_sample": False}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.max_new_tokens
        if self.eos_token_id is not None:
            kwargs["eos_token_id"] = self.eos_token_id
        return kwargs


class TokenStream:
    """A generating request's text as it is produced: `on_text` receives each new piece and
    the `TokenLogprob`s of the tokens it came from (None: not asked for), called from the
    engine's thread; `cancel()` (a client gone) stops the row at the next step."""

    def __init__(self, on_text: Callable[[str, list[TokenLogprob] | None], None]):
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
        logprobs: the row's `TokenLogprob`s as the decoder appends them (None: not asked
            for); each piece streamed carries those of the tokens since the last piece.
    """

    def __init__(self, tokenizer, eos: int | None, stops: tuple[str, ...] | list[str], stream: TokenStream | None,
                 decode: Callable[[Any, torch.Tensor], list[str]] | None = None,
                 logprobs: list[TokenLogprob] | None = None):
        self.tokenizer, self.eos, self.stops, self.stream, self.decode = tokenizer, eos, list(stops), stream, decode
        self.logprobs, self._sent = logprobs, 0
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

    def _decoded(self) -> str:
        """Every token so far as text, cut at the first stop string (`stopped` set then)."""
        if self.decode is not None:
            text = self.decode(self.tokenizer, torch.tensor([self.ids]))[0]
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            if s in text:
                text, self.stopped = text[: text.index(s)], True
        return text

    def _update(self) -> None:
        text = self._decoded()
        if text.startswith(self.text) and len(text) > len(self.text) and not text.endswith("\ufffd"):
            self._send(text)  # a piece: wait for whole characters
        elif not text.startswith(self.text):  # re-tokenised text changed earlier characters: keep the new
            self.text = text

    def _send(self, text: str) -> None:
        piece, self.text = text[len(self.text):], text
        if self.stream is not None and not self.stream.cancelled:
            self.stream.emitted = True
            self.stream.on_text(piece, self.unsent_logprobs())

    def flush(self) -> None:
        """The row has ended: the characters held back waiting for the rest of a multi-byte
        character go out as they decode (U+FFFD where the bytes stop short), so the final
        text is the whole decoding of the row's tokens, as `tokenizer.decode` gives it."""
        if not self.ids:
            return
        text = self._decoded()
        if text.startswith(self.text) and len(text) > len(self.text):
            self._send(text)
        elif not text.startswith(self.text):
            self.text = text

    def unsent_logprobs(self) -> list[TokenLogprob] | None:
        """The log-probabilities of the tokens since the last piece streamed (None: not asked for)."""
        if self.logprobs is None:
            return None
        new, self._sent = self.logprobs[self._sent:], len(self.logprobs)
        return new

    def finish(self, tokens: list[int]) -> None:
        """After generate(): the same tokens (a row that never streamed) decoded at once."""
        if not self.ids and not self.stopped:
            for t in tokens:
                if self.add(t):
                    break
        self.flush()


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
