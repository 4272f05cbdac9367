"""Exceptions raised by softprompt. All derive from `SoftPromptError` (a `ValueError`)."""

from __future__ import annotations

import os


class SoftPromptError(ValueError):
    """Base class of every error softprompt raises on bad input."""


class ConfigError(SoftPromptError):
    """A method configuration is invalid (names the field)."""


class TemplateError(SoftPromptError):
    """A template cannot be parsed or rendered.

    Attributes:
        column: 1-based column of the offending character, when the error is a syntax error.
    """

    def __init__(self, message: str, template: str | None = None, column: int | None = None):
        self.template = template
        self.column = column
        if template is not None and column is not None:
            pointer = " " * (column - 1) + "^"
            message = f"{message} (column {column})\n  {template}\n  {pointer}"
        super().__init__(message)


class EncodingError(SoftPromptError):
    """An example cannot be encoded with a template (missing field, too long, ...)."""


class InputTooLongError(EncodingError):
    """An input exceeds the length limit and truncation was not allowed."""


class UnsupportedModelError(SoftPromptError):
    """The base model cannot take the requested prompt."""


class PromptFileError(SoftPromptError):
    """A saved prompt on disk is missing, corrupt, or of an unknown format version."""


class BaseModelMismatchError(SoftPromptError):
    """A saved prompt was trained for another base model."""


class DataError(SoftPromptError):
    """A data file, dataset or recipe cannot be read as examples.

    Attributes:
        path: the file (or ``hf:`` source) at fault, when there is one.
        line: 1-based line of the file (``unit == "row"``: row of a dataset), or None.
        column: 1-based column, for JSON syntax errors.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 column: int | None = None, unit: str = "line"):
        self.path = None if path is None else str(path)
        self.line, self.column, self.unit = line, column, unit
        where = self.path or ""
        if line is not None:
            where += f", {unit} {line}" + (f", column {column}" if column is not None else "")
        super().__init__(f"{where}: {message}" if where else message)


class TrainingError(SoftPromptError):
    """Training cannot go on (non-finite loss, a run directory in the way, ...)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): for
    messages that quote another library's error inside ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
