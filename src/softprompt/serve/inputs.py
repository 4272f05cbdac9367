"""A request's input as an example of its task's template fields, checked before it joins
a batch: anything a batch would fail on is refused here, for that request alone.

    example_of(entry, "Anna lives in Paris")   # {"tokens": ["Anna", "lives", "in", "Paris"]} for NER
    example_of(entry, {"text": "\\ud800 x"})    # EncodingError: field 'text' is not valid Unicode (a lone surrogate, ...

An input is a text (it fills the template's only field; split into words for a task that
reads words, `Task.word_field`), token ids (`encode.TokenIds`: they fill the only field as
they are; `check_token_ids`) or an object of fields; a field's value is a text or a list
of words. Every text must be valid Unicode: JSON can carry a lone UTF-16 surrogate, which
no tokenizer takes (the batched tokenizer call then fails for every text in it).
"""

from __future__ import annotations

from typing import Any, Iterator

from ..data.checks import unicode_problem
from ..encode import TokenIds
from ..errors import EncodingError, SoftPromptError
from .entry import BankEntry


def example_of(entry: BankEntry, value: Any) -> dict[str, Any]:
    """The input as an example of the entry's template fields, each one checked (`check_field`).

    Raises:
        SoftPromptError: not a text or an object, or a text for a template of several fields.
        EncodingError: a field of the wrong type, or text that is not valid Unicode (names
            the field, the word and the character).
    """
    fields = entry.model.template.fields
    if isinstance(value, TokenIds):
        if len(fields) != 1:
            raise SoftPromptError(f"token ids fill a template's one text field; task {entry.name!r} has template "
                                  f"fields {list(fields)}: send an object of texts")
        if entry.task is not None and entry.task.word_field == fields[0]:
            raise SoftPromptError(f"task {entry.name!r} reads words (field {fields[0]!r}): send text, not token ids")
        return {fields[0]: value}
    if isinstance(value, str):
        if len(fields) != 1:
            raise SoftPromptError(f"task {entry.name!r} has template fields {list(fields)}: send an object with them")
        check_field(fields[0], value)  # before it is split: the position is the client's
        words = entry.task is not None and entry.task.word_field == fields[0]
        return {fields[0]: value.split() if words else value}
    if not isinstance(value, dict):
        raise SoftPromptError(f"an input is a text or an object of fields, got {type(value).__name__}")
    for name in fields:
        if name in value:  # a missing field: the encoder names it with the template's fields
            check_field(name, value[name])
    return value


def check_field(name: str, value: Any) -> None:
    """A field's value: a text, or a list of words (texts), every text valid Unicode.

    Raises:
        EncodingError: naming the field, the word and the character.
    """
    if isinstance(value, str):
        check_text(value, f"field {name!r}")
    elif isinstance(value, (list, tuple)):
        for w, word in enumerate(value):
            if not isinstance(word, str):
                raise EncodingError(f"field {name!r}, word {w}: a word is a text, got {type(word).__name__}")
            check_text(word, f"field {name!r}, word {w}")
    else:
        raise EncodingError(f"field {name!r} must be a text or a list of words, got {type(value).__name__}")


def check_text(text: str, where: str) -> None:
    """Raises `EncodingError` if `text` is not valid Unicode (`data.checks.unicode_problem`,
    the one wording for training data and requests)."""
    problem = unicode_problem(text)
    if problem:
        raise EncodingError(f"{where} {problem}")


class TokenIdError(SoftPromptError):
    """A token id that is not one of the vocabulary's, at `position` of the ids."""

    def __init__(self, position: int, problem: str):
        super().__init__(f"token {position}: {problem}")
        self.position, self.problem = position, problem


def check_token_ids(ids: Any, vocabulary_size: int) -> None:
    """Token ids: integers from 0 to `vocabulary_size` - 1.

    Raises:
        TokenIdError: the first one that is not, with its position.
    """
    for j, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise TokenIdError(j, f"{token!r} is not a token id (an integer)")
        if not 0 <= token < vocabulary_size:
            raise TokenIdError(j, f"id {token} is outside the vocabulary (0 to {vocabulary_size - 1})")


def field_texts(entry: BankEntry, example: dict[str, Any]) -> Iterator[str]:
    """The texts of a checked example's template fields (a word list's words; token ids
    have none)."""
    for name in entry.model.template.fields:
        value = example.get(name)
        if isinstance(value, TokenIds):
            continue
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from value


__all__ = ["example_of", "check_field", "check_text", "check_token_ids", "TokenIdError", "field_texts"]
