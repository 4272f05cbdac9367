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
from itertools import accumulate
from typing import Any, Sequence

from .sampling import TokenLogprob
from .scoring import PromptLogprobs

_TEXTS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()
_TEXTS_LOCK = threading.Lock()
_PAST: "weakref.WeakKeyDictionary[Any, dict[int, str]]" = weakref.WeakKeyDictionary()  # ids past the table


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
    return _texts_of(tokenizer)(token)


def _texts_of(tokenizer):
    """``text(id)``: the table looked up once; an id past the tokenizer's own (a model's
    padded vocabulary rows) decoded alone once and remembered (a random-init model's top
    alternatives land there more often than not: decoded each time, they took 16% of the
    event loop in the scoring benchmark on an H100)."""
    texts = token_texts(tokenizer)
    past = _PAST.setdefault(tokenizer, {})

    def text(t: int) -> str:
        if 0 <= t < len(texts):
            return texts[t]
        found = past.get(t)
        if found is None:
            found = past[t] = tokenizer.decode([t])
        return found

    return text


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
    ``token_logprobs[len(context):-1]``). Runs on the server's event loop, a few hundred
    tokens a request: `_scored_columns` reads the scores as they lie."""
    text = _texts_of(tokenizer)
    tokens = [text(t) for t in prompt_ids]
    offsets = list(accumulate(map(len, tokens), initial=0))
    offset = offsets.pop()
    logprobs, tops = _scored_columns(tokenizer, tokens, prompt)
    head = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
    tail = completion_logprobs(tokenizer, generated, offset)
    return {key: head[key] + tail[key] for key in head}


def _scored_columns(tokenizer, tokens: list[str], prompt: Sequence[TokenLogprob | None]) -> tuple[list, list]:
    """``token_logprobs`` and ``top_logprobs`` of an echoed prompt whose token texts are
    `tokens`: null first, then each token's and its best ones (itself among them)."""
    if not tokens:
        return [], []
    if not isinstance(prompt, PromptLogprobs):
        scored = [(e.logprob, e.top) for e in prompt[1:]]
    else:
        rows = prompt.table[prompt.start: prompt.start + len(tokens) - 1]  # (1 + 2K) floats each
        K = (len(rows[0]) - 1) // 2 if rows else 0
        texts = token_texts(tokenizer)
        if prompt.k == 1 and all(v[1 + K] < len(texts) for v in rows):  # lm-eval's: the one best token
            logprobs = [None] + [v[0] for v in rows]
            tops = [None] + [{texts[int(v[1 + K])]: v[1]} for v in rows]
            for top, token, lp in zip(tops[1:], tokens[1:], logprobs[1:]):
                top.setdefault(token, lp)
            return logprobs, tops
        scored = [(v[0], [(int(v[1 + K + t]), v[1 + t]) for t in range(prompt.k)]) for v in rows]
    text = _texts_of(tokenizer)
    logprobs, tops = [None], [None]
    for token, (logprob, top) in zip(tokens[1:], scored):
        logprobs.append(logprob)
        best = {text(t): lp for t, lp in top}
        best.setdefault(token, logprob)
        tops.append(best)
    return logprobs, tops


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


__all__ = ["completion_logprobs", "echo_logprobs", "chat_logprobs", "token_text", "token_texts"]
