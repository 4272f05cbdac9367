"""Log-probabilities of generated tokens in OpenAI's two formats.

Each new token's `TokenLogprob` (`sampling.py`: the log-softmax of the model's raw scores at
that step, before temperature and filters, as a forward over the text gives them, and the
most likely tokens') becomes, for a completion (``logprobs: k``)::

    {"tokens": [" Paris", "."], "token_logprobs": [-0.2, -1.1],
     "top_logprobs": [{" Paris": -0.2, " Lyon": -2.9}, ...], "text_offset": [0, 6]}

(``top_logprobs`` holds the k most likely tokens and the chosen one: at most k + 1, as
OpenAI's; ``text_offset`` counts characters of the completion's text), and for a chat
completion (``logprobs: true, top_logprobs: k``)::

    {"content": [{"token": " Paris", "logprob": -0.2, "bytes": [32, 80, ...],
                  "top_logprobs": [{"token": " Paris", "logprob": -0.2, "bytes": [...]}, ...]}],
     "refusal": null}

A token's text is the tokenizer's decoding of that token alone (a token holding part of a
multi-byte character decodes to U+FFFD, as vLLM's does), looked up in a table of the whole
vocabulary decoded once per tokenizer (`token_texts`): an echoed prompt of lm-eval lists
hundreds of tokens and their best alternatives, and one ``decode`` call each (about 3 us)
cost more host time than the model's forward over them on a GPU.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Sequence

from .sampling import TokenLogprob
from .scoring import PromptLogprobs

_TEXTS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()
_TEXTS_LOCK = threading.Lock()


def token_texts(tokenizer) -> list[str]:
    """Every token's text alone (``tokenizer.decode([id])`` for each id of the tokenizer's
    vocabulary), decoded in one batch on first use and kept while the tokenizer lives."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        with _TEXTS_LOCK:
            texts = _TEXTS.get(tokenizer)
            if texts is None:
                texts = _TEXTS[tokenizer] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return texts


def token_text(tokenizer, token: int) -> str:
    texts = token_texts(tokenizer)
    # an id past the tokenizer's own (a model's padded vocabulary rows): decoded alone, as before
    return texts[token] if 0 <= token < len(texts) else tokenizer.decode([token])


def _texts_of(tokenizer):
    """``text(id)``: `token_text` with the table looked up once."""
    texts = token_texts(tokenizer)
    return lambda t: texts[t] if 0 <= t < len(texts) else tokenizer.decode([t])


def completion_logprobs(tokenizer, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A completion choice's ``logprobs`` (`offset`: characters of text before these tokens)."""
    tokens, offsets, tops = [], [], []
    text_of = _texts_of(tokenizer)
    for e in entries:
        text = text_of(e.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top = {text_of(t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def echo_logprobs(tokenizer, prompt_ids: Sequence[int], prompt: Sequence[TokenLogprob | None],
                  generated: Sequence[TokenLogprob]) -> dict[str, Any]:
    """An echoed completion's ``logprobs``: the prompt's own tokens (`prompt_ids`, with their
    `scoring.PromptLogprobs`; null where there is none: the first), then the generated
    tokens', offsets counted from the prompt's start (lm-eval's loglikelihood reads
    ``token_logprobs[len(context):-1]``)."""
    text = _texts_of(tokenizer)
    tokens = [text(t) for t in prompt_ids]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    scored = prompt.columns() if isinstance(prompt, PromptLogprobs) else \
        ((e.token, e.logprob, e.top) for e in prompt[1:])
    logprobs, tops = [None] * bool(tokens), [None] * bool(tokens)
    for token, (_, logprob, top) in zip(tokens[1:], scored):
        logprobs.append(logprob)
        best = {text(t): lp for t, lp in top}
        best.setdefault(token, logprob)
        tops.append(best)
    head = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
    tail = completion_logprobs(tokenizer, generated, offset)
    return {key: head[key] + tail[key] for key in head}


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


__all__ = ["completion_logprobs", "echo_logprobs", "chat_logprobs", "token_text", "token_texts"]
