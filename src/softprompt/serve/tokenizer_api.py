"""The served base's tokenizer over HTTP, in vLLM's shapes (lm-eval's ``remote``
tokenizer backend, its default against a server that has them, reads exactly these):

    GET  /tokenizer_info   {"tokenizer_class", "eos_token", "bos_token", "pad_token",
                            "unk_token", "chat_template", "model_max_length", ...}
    POST /tokenize         {"prompt": text, "add_special_tokens": true} or {"messages": [...],
                           "add_generation_prompt": true}  -> {"count", "max_model_len",
                           "tokens", "token_strs"}
    POST /detokenize       {"tokens": [ids]}  -> {"prompt": text}

Every task of a server shares its base's tokenizer: ``model``, when given, must name a
served task (or the base), and does not change the answer. The ids are the base's own
tokenization: what a completion's ``prompt`` of token ids (`encode.TokenIds`) takes. A
task's template adds its virtual tokens and its own text around them; `/tokenize` does not
(the virtual tokens are not the vocabulary's). Text with a lone surrogate never gets here:
the body parser refuses it, for every route (`guard.parse_json_body`, 422).
"""

from __future__ import annotations

from typing import Any, Union

from fastapi import Request as HTTPRequest
from pydantic import Field, StrictInt

from ..architecture import model_spec
from ..errors import SoftPromptError
from .chat import render_chat
from .inputs import TokenIdError, check_token_ids
from .openai_bodies import ChatMessage
from .server import APIError, Server, _Body, server_of


class TokenizeBody(_Body):
    """A text to tokenize (``prompt``), or chat messages rendered by the chat template first."""

    model: Union[str, None] = None
    prompt: Union[str, None] = None
    messages: Union[list[ChatMessage], None] = Field(None, min_length=1)
    add_special_tokens: Union[bool, None] = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(_Body):
    model: Union[str, None] = None
    tokens: list[StrictInt]


def _check_model(server: Server, model: str | None) -> None:
    if model is not None and model not in server.bank:
        raise APIError(404, f"model {model!r} is not served; the served ones are {server.bank.names()}", "model",
                       "model_not_found")


def max_model_len(server: Server) -> int | None:
    """Most positions the base takes (None: no limit, relative positions)."""
    return model_spec(server.bank.base).max_positions


async def tokenizer_info(request: HTTPRequest) -> dict[str, Any]:
    tokenizer = server_of(request).bank.tokenizer
    info: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        info[name] = None if value is None else str(value)
    info["chat_template"] = getattr(tokenizer, "chat_template", None)
    limit = max_model_len(server_of(request))
    info["model_max_length"] = limit if limit is not None else int(min(tokenizer.model_max_length, 2**31 - 1))
    return info


async def tokenize(body: TokenizeBody, request: HTTPRequest) -> dict[str, Any]:
    server = server_of(request)
    _check_model(server, body.model)
    tokenizer = server.bank.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give a prompt or messages (one of the two)", "prompt")
    if body.messages is not None:
        try:
            text = render_chat(tokenizer, [m.model_dump() for m in body.messages], [],
                               add_generation_prompt=body.add_generation_prompt)
        except SoftPromptError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        special = bool(body.add_special_tokens)
    else:
        text, special = body.prompt, body.add_special_tokens is not False
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return {"count": len(ids), "max_model_len": max_model_len(server), "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}


async def detokenize(body: DetokenizeBody, request: HTTPRequest) -> dict[str, Any]:
    server = server_of(request)
    _check_model(server, body.model)
    try:
        check_token_ids(body.tokens, server.bank.vocabulary_size)
    except TokenIdError as e:
        raise APIError(400, f"tokens[{e.position}]: {e.problem}", f"tokens[{e.position}]") from None
    return {"prompt": server.bank.tokenizer.decode(body.tokens)}


#: (methods, path, route function)
TOKENIZER_ROUTES = [(["GET"], "/tokenizer_info", tokenizer_info), (["POST"], "/tokenize", tokenize),
                    (["POST"], "/detokenize", detokenize)]

__all__ = ["TOKENIZER_ROUTES", "TokenizeBody", "DetokenizeBody"]
