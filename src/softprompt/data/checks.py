"""Row checks: what every example of a split must hold, each failure naming the file, the
line (or dataset row) and the field.

The readers return `Examples`, lists that remember where each example was read, so a check
that runs long after reading (the template's fields are known only once the model and the
template are) still names the line:

    train = read_examples("train.jsonl")                 # Examples: train.lines[i] is row i's line
    labels = check_labels(train)                         # every row labelled; the labels seen
    check_labels(read_examples("dev.jsonl"), labels, "the training labels")
    check_fields(train, ["text"])                        # present, a string, not empty
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import DataError


class Examples(list):
    """Example dicts, with where each was read.

    Attributes:
        path: the file (or ``hf:`` source) they came from.
        lines: the 1-based line (``unit == "row"``: dataset row) of each example.
        unit: ``line`` or ``row``.
        word_per_line: word j of example i is on line ``lines[i] + j`` (CoNLL).
        columns: example key -> the file's column it was read from, where they differ
            (``--field review:text``: ``{"text": "review"}``), so errors name what the user wrote.
    """

    def __init__(self, items: Iterable[dict] = (), path: str | None = None, lines: Sequence[int] | None = None,
                 unit: str = "line", word_per_line: bool = False, columns: Mapping[str, str] | None = None):
        super().__init__(items)
        self.path, self.unit, self.word_per_line = path, unit, word_per_line
        self.lines = list(lines) if lines is not None else None
        self.columns = dict(columns or {})


def field_name(examples: Sequence[dict], name: str) -> str:
    """How errors name the example key `name`: ``'text'``, or ``'review' (read as 'text')``."""
    column = getattr(examples, "columns", {}).get(name)
    return f"{column!r} (read as {name!r})" if column and column != name else repr(name)


def row_error(examples: Sequence[dict], i: int, message: str, source: str | None = None,
              word: int | None = None) -> DataError:
    """A `DataError` naming where example `i` (0-based; `word`: its word `word`) was read:
    its file and line when `examples` are `Examples`, else ``source, example i+1``."""
    lines = getattr(examples, "lines", None)
    if lines is not None and len(lines) == len(examples):  # (a list changed since it was read: no lines)
        line = lines[i] + (word if word is not None and examples.word_per_line else 0)
        return DataError(message, examples.path, line, unit=examples.unit)
    where = f"{source}, example {i + 1}" if source else f"example {i + 1}"
    return DataError(f"{where}: {message}")


def closest(name: Any, known: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `known` to `name`, or nothing."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- text --------------------------------------------------------------------------------------
def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be encoded (and so tokenized), or None: JSON's ``\\ud800`` escapes
    decode to lone UTF-16 surrogates, which no UTF-8 text holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode (a lone surrogate, U+{ord(text[e.start]):04X} at character {e.start + 1})"
    return None


def record_unicode_problem(record: Mapping[str, Any]) -> str | None:
    """The first string of a parsed record (its keys and values, at any depth) that is not
    valid Unicode, described with the field that holds it; None if all are. Iterative: a
    record nested as deep as the JSON parser allows is walked without recursion."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            problem = unicode_problem(value)
            if problem:
                return f"{where} {problem}"
        elif isinstance(value, Mapping):
            for key, item in reversed(list(value.items())):
                name = f"field {key!r}" if not where else f"{where}[{key!r}]"
                problem = unicode_problem(key) if isinstance(key, str) else None
                if problem:
                    return f"a field name ({key!r}) {problem}"
                stack.append((name, item))
        elif isinstance(value, list):
            stack += [(f"{where} item {j + 1}", item) for j, item in reversed(list(enumerate(value)))]
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def field_problem(value: Any, name: str, words: bool = False) -> str | None:
    """Why `value` cannot fill a template field, or None: it must be a non-empty string
    (`words`: a non-empty list of non-empty strings, the words of a tagging task). `name`
    is the field as the message shows it (`field_name`)."""
    if words:
        if not isinstance(value, list):
            return f"field {name} must be a list of words, got {_type_name(value)}"
        if not value:
            return f"field {name} is an empty list of words"
        for j, word in enumerate(value):
            problem = field_problem(word, f"{name}: word {j + 1}")
            if problem:
                return problem
        return None
    if value is None:
        return f"field {name} is null"
    if not isinstance(value, str):
        return f"field {name} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"field {name} is empty"
    problem = unicode_problem(value)
    return f"field {name} {problem}" if problem else None


def check_fields(examples: Sequence[dict], fields: Sequence[str], word_field: str | None = None,
                 source: str | None = None, template: str | None = None) -> None:
    """Every example has each of `fields`, a non-empty string (`word_field`: a list of words).

    Raises:
        DataError: names the file and line (or `source` and the example number), the field
            and what it holds instead (a missing field: the `template` that uses it).
    """
    for i, example in enumerate(examples):
        for name in fields:
            if name not in example:
                used = f" used by the template {template!r}" if template else ""
                raise row_error(examples, i, f"no field {name!r}{used}; its fields are {sorted(example)} (map a "
                                             f"column to a field with --field COLUMN:{name})", source)
            problem = field_problem(example[name], field_name(examples, name), words=name == word_field)
            if problem:
                raise row_error(examples, i, problem, source)


# -- labels and tags -----------------------------------------------------------------------------
def label_problem(record: Mapping[str, Any], known: Sequence[str] | None, known_as: str = "known labels",
                  field: str = "'label'") -> str | None:
    """Why a record's (normalised) ``label`` is not one of `known`, or None. A missing label
    (left out by the readers when it is null) and an empty one are problems too. `field`:
    the label's column as the message shows it."""
    if "label" not in record:
        return f"no label: field {field} is missing or null"
    label = record["label"]
    if label == "":
        return f"field {field} is an empty label"
    if known is not None and label not in known:
        return f"unknown label {label!r}{closest(label, known)}; {known_as}: {list(known)}"
    return None


def check_labels(examples: Sequence[dict], known: Sequence[str] | None = None, known_as: str = "known labels",
                 source: str | None = None) -> list[str]:
    """Every example carries a label, one of `known` when given (labels compare as the
    strings `normalise_label` makes: ``1`` and ``"1"`` are one label).

    Returns:
        The labels seen, sorted.

    Raises:
        DataError: file, line, the label and `known`, described as `known_as`.
    """
    for i, example in enumerate(examples):
        problem = label_problem(example, known, known_as, field_name(examples, "label"))
        if problem:
            raise row_error(examples, i, problem, source)
    return sorted({e["label"] for e in examples})


def check_tags(examples: Sequence[dict], known: Sequence[str] | None = None, known_as: str = "known tags",
               words: str = "tokens", tags: str = "tags", source: str | None = None) -> list[str]:
    """Every example of a tagging task has a list of string tags, one per word, each one of
    `known` when given.

    Returns:
        The tags seen, sorted.

    Raises:
        DataError: file, line (a CoNLL sentence's first line), the word and the tag.
    """
    allowed = None if known is None else set(known)
    shown_tags, shown_words = field_name(examples, tags), field_name(examples, words)
    for i, example in enumerate(examples):
        row, sentence = example.get(tags), example.get(words)
        if tags not in example:
            raise row_error(examples, i, f"no field {shown_tags} (the tags of the words)", source)
        if not isinstance(row, list):
            raise row_error(examples, i, f"field {shown_tags} must be a list of tags, got {_type_name(row)}", source)
        if isinstance(sentence, list) and len(row) != len(sentence):
            raise row_error(examples, i, f"{len(row)} tags in {shown_tags} for {len(sentence)} words in {shown_words}",
                            source)
        for j, tag in enumerate(row):
            word = f"word {j + 1}" + (f" ({sentence[j]!r})" if isinstance(sentence, list) else "")
            if not isinstance(tag, str) or not tag.strip():
                got = "empty" if isinstance(tag, str) else f"{_type_name(tag)}, not a string"
                raise row_error(examples, i, f"field {shown_tags}: the tag of {word} is {got}", source, j)
            if allowed is not None and tag not in allowed:
                raise row_error(examples, i, f"field {shown_tags}: unknown tag {tag!r}{closest(tag, allowed)} of {word}; "
                                             f"{known_as}: {sorted(allowed)}", source, j)
    return sorted({t for e in examples for t in e[tags]})


__all__ = ["Examples", "check_fields", "check_labels", "check_tags", "closest", "field_name", "field_problem",
           "label_problem", "record_unicode_problem", "row_error", "unicode_problem"]
