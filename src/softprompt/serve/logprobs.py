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
multi-byte character decodes to U+FFFD, as vLLM's does).
"""

from __future__ import annotations

from typing import Any, Sequence

from .sampling import TokenLogprob


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A completion choice's ``logprobs`` (`offset`: characters of text before these tokens)."""
    tokens, offsets, tops = [], [], []
    for e in entries:
        text = token_text(tokenizer, e.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top = {token_text(tokenizer, t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def echo_logprobs(tokenizer, prompt_ids: Sequence[int], prompt: Sequence[TokenLogprob | None],
                  generated: Sequence[TokenLogprob]) -> dict[str, Any]:
    """An echoed completion's ``logprobs``: the prompt's own tokens (`prompt_ids`, with their
    `scoring.prompt_logprobs` entries; null where there is none: the first), then the
    generated tokens', offsets counted from the prompt's start (lm-eval's loglikelihood
    reads ``token_logprobs[len(context):-1]``)."""
    head = {"tokens": [token_text(tokenizer, t) for t in prompt_ids],
            "token_logprobs": [None if e is None else e.logprob for e in prompt], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, e in zip(head["tokens"], prompt):
        head["text_offset"].append(offset)
        offset += len(token)
        if e is None:
            head["top_logprobs"].append(None)
        else:
            top = {token_text(tokenizer, t): lp for t, lp in e.top}
            top.setdefault(token, e.logprob)
            head["top_logprobs"].append(top)
    tail = completion_logprobs(tokenizer, generated, offset)
    return {key: head[key] + tail[key] for key in head}


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


__all__ = ["completion_logprobs", "echo_logprobs", "chat_logprobs"]
