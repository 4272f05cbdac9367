"""The OpenAI API's request bodies for ``POST /v1/completions`` and ``POST
/v1/chat/completions``, as pydantic models: every OpenAI field softprompt does not
implement is refused by name unless its value asks for nothing (`UNIMPLEMENTED`,
`CHAT_UNIMPLEMENTED`), never ignored. The routes that read them are in `openai_api`."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Union

from pydantic import Field, StrictBool, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .server import _Body
from .text import MAX_LOGPROBS


class _OpenAIBody(_Body):
    """An OpenAI request body: the fields of its `UNIMPLEMENTED` table (OpenAI fields
    softprompt does not implement, and the values of each that ask for nothing, which a
    client that does not use the field may still send) are refused by name unless
    neutral, rather than ignored."""

    UNIMPLEMENTED: ClassVar[dict[str, tuple]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _unimplemented(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = cls.UNIMPLEMENTED.get(info.field_name)
        if neutral is not None and not any(_same(value, v) for v in neutral):
            raise PydanticCustomError("unimplemented", "softprompt does not implement {field} (it takes only {neutral})",
                                      {"field": info.field_name, "neutral": " or ".join(map(json.dumps, neutral))})
        return value


#: OpenAI's completion fields that softprompt does not implement, and their neutral values
UNIMPLEMENTED = {"suffix": (None,)}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_OpenAIBody):
    """The generation fields completions and chat share."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: Union[int, None] = None
    n: int = Field(1, ge=1)
    user: Union[str, None] = None
    stream_options: Union[StreamOptions, None] = None
    presence_penalty: Union[float, None] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Union[float, None] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Union[dict[str, float], None] = None


class _Prompted(_OpenAIBody):
    """``prompt``: a text, texts, token ids or lists of token ids (OpenAI's four forms)."""

    model: str
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class CompletionBody(_Sampled, _Prompted):  # fields in reversed base order: model, prompt, max_tokens, ...
    UNIMPLEMENTED: ClassVar[dict[str, tuple]] = UNIMPLEMENTED

    max_tokens: int = Field(16, ge=0)  # 0: with echo, the prompt scored and nothing generated
    echo: StrictBool = False
    logprobs: Union[int, None] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Union[int, None] = Field(None, ge=1)
    suffix: Any = None


def _same(value: Any, neutral: Any) -> bool:
    """`value` is the JSON value `neutral`: Python's True == 1 and False == 0, so a boolean
    matches only a boolean (``echo: 0``, ``presence_penalty: false`` are not neutral)."""
    if isinstance(value, bool) or isinstance(neutral, bool) or neutral is None:
        return value is neutral
    return value == neutral


#: OpenAI's chat fields that softprompt does not implement, and their neutral values
CHAT_UNIMPLEMENTED = {"tools": (None, []),
                      "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "functions": (None, []),
                      "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
                      "modalities": (None, ["text"]), "audio": (None,),
                      "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
                      "store": (None, False), "metadata": (None,), "service_tier": (None, "auto")}


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class _Chatting(_OpenAIBody):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)


class ChatBody(_Sampled, _Chatting):
    """A chat completion: `max_completion_tokens` (OpenAI's current name) or `max_tokens`."""

    UNIMPLEMENTED: ClassVar[dict[str, tuple]] = CHAT_UNIMPLEMENTED

    max_completion_tokens: Union[int, None] = Field(None, ge=1)
    logprobs: Union[bool, None] = None
    top_logprobs: Union[int, None] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None


__all__ = ["UNIMPLEMENTED", "CHAT_UNIMPLEMENTED", "StreamOptions", "CompletionBody", "ChatMessage", "ChatBody"]
