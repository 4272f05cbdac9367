"""Readers: data files (jsonl, json, csv, tsv, CoNLL) and Hugging Face datasets -> ``list[dict]``.

Every reader returns example dicts in the conventions of `softprompt.tasks.base`
(``{fields..., "label": str}`` for classification, ``{"tokens": [...], "tags": [...]}``
for NER), as `Examples` (a list that remembers each example's line, for the row checks of
`checks.py`). Bad input raises `DataError` naming the file and the 1-based line (or row,
for Hugging Face datasets) where it was found.

    read_examples("train.tsv", fields={"sentence": "text"}, labels=["0", "1"])
    read_examples("wnut17/dev.conll")
    read_examples("hf:glue/sst2:validation", fields={"sentence": "text"})
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .checks import Examples, closest, label_problem, record_unicode_problem
from .hf import disk_records, disk_split, hf_records

FORMATS = ("jsonl", "json", "csv", "tsv", "conll", "hf", "disk")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".conll": "conll"}
BOM = "\ufeff"

Records = Iterator[tuple[int, dict[str, Any]]]  # (1-based line or row, raw record)


def normalise_label(value: Any) -> str:
    """A label as the string the tasks compare: booleans -> ``"true"`` / ``"false"``
    (SuperGLUE BoolQ, WiC), integers (and integral floats) -> their digits, strings stripped.

    Raises:
        TypeError: a null, list, object or non-finite number (JSON's ``NaN``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"a label must be a finite number, got {value}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, float)):
        return str(value).strip()
    raise TypeError(f"a label must be a string, number or boolean, got {type(value).__name__}")


def infer_format(path: str | os.PathLike) -> str:
    """The reader for `path`: ``hf`` for ``hf:...``, else from the file suffix."""
    source = os.fspath(path)
    if source.startswith("hf:"):
        return "hf"
    suffix = Path(source).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"cannot tell the format from the suffix {suffix or '(none)'!r}; known suffixes: "
                        f"{', '.join(SUFFIXES)}; or pass format= one of {FORMATS}", source)
    return SUFFIXES[suffix]


def read_examples(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    fields: dict[str, str] | None = None,
    label_field: str = "label",
    labels: Sequence[Any] | None = None,
    required: Sequence[str] = (),
    split: str | None = None,
) -> Examples:
    """Read examples from a file, a saved dataset directory or a Hugging Face dataset.

    Args:
        path: a ``.jsonl`` / ``.json`` (a list of objects, or JSON lines) / ``.csv`` /
            ``.tsv`` (header required) / ``.conll`` (``token<TAB>tag`` lines, blank line
            between sentences) file; a directory written by ``Dataset.save_to_disk``
            (``DIR`` or ``DIR:SPLIT`` for a ``DatasetDict``); or ``hf:NAME[/CONFIG][:SPLIT]``
            (``hf:glue/sst2:validation``; ``hf:ORG/NAME/CONFIG``; ``hf:ORG/NAME/`` for no
            config), loaded with ``datasets.load_dataset`` (split default ``train``).
        format: one of `FORMATS`; default: from the suffix.
        fields: file column -> example key (``{"sentence": "text"}``); each column named
            here must be present in every record. Unnamed columns keep their names.
        label_field: the column holding the label; it is stored under ``"label"``,
            normalised with `normalise_label` (a missing or null label is left out, as at
            predict time).
        labels: the allowed labels (NER: the allowed tags); every record must carry one.
        required: example keys (after `fields` renaming) every record must have.
        split: the split of a ``hf:`` source or a saved ``DatasetDict``.

    Returns:
        One dict per example (NER: one per sentence, ``{"tokens": [...], "tags": [...]}``).
        CSV / TSV values are strings stripped of surrounding whitespace; JSON values are
        kept as they are, except the label. The list is `Examples`: ``examples.lines[i]``
        is the line (or row) example i was read from.

    Raises:
        DataError: a missing file; an unknown format; text that is not UTF-8; invalid JSON;
            a JSON string that is not valid Unicode (a lone surrogate escape); a record with
            a missing field or an unknown label; a CoNLL line without a tag; no examples at
            all. The message names the file and the 1-based line.
    """
    source = os.fspath(path)
    fmt = format
    if fmt is None:
        if source.startswith("hf:"):
            fmt = "hf"
        elif Path(source).is_dir() or (not Path(source).exists() and disk_split(source)):
            fmt = "disk"
        elif not Path(source).exists():
            raise DataError(f"no such file (looked for {Path(source).resolve()})", source)
        else:
            fmt = infer_format(source)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", source)
    allowed = None if labels is None else [normalise_label(x) for x in labels]
    columns = list(fields or {})
    if allowed is not None and fmt != "conll":
        columns.append(label_field)
    unit, note = "line", ""
    if fmt == "hf":
        records, unit = hf_records(source if source.startswith("hf:") else "hf:" + source, split), "row"
    elif fmt == "disk":
        records, unit = disk_records(source, split), "row"
    else:
        text = read_text(source)
        note = " (the file is empty)" if not text.strip() else ""
        if fmt == "jsonl":
            records = _jsonl_records(text, source)
        elif fmt == "json":
            records = _json_records(text, source)
        elif fmt in ("csv", "tsv"):
            records = _csv_records(text, source, fmt, columns)
        else:
            records = _conll_records(text, source, allowed)
    out = _normalise(records, source, unit, fields or {}, label_field, allowed if fmt != "conll" else None,
                     columns, required)
    out.word_per_line = fmt == "conll"
    if not out:
        raise DataError(f"no examples{note or (' in split ' + repr(split) if split else '')}", source)
    return out


def read_text(path: str | os.PathLike) -> str:
    """A file's text: UTF-8, a leading byte-order mark dropped.

    Raises:
        DataError: no such file, or bytes that are not UTF-8 (names the line and byte offset).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no such file (looked for {p.resolve()})", path) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from None
    for bom, name in ((b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if data.startswith(bom):
            raise DataError(f"the file is {name} encoded (byte-order mark {bom!r}); save it as UTF-8", path, 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} (byte {col} of the "
                        f"line) cannot be decoded; save the file as UTF-8 (it may be Latin-1 or cp1252)",
                        path, line) from None


# -- parsers: text -> (line, record) ------------------------------------------------------
def _jsonl_records(text: str, path: str, first_line: int = 1) -> Records:
    # split on "\n" only: str.splitlines would also break at U+2028 etc., legal inside JSON strings
    for number, line in enumerate(text.split("\n"), first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", path, number, e.colno) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", path, number) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object per line, got {type(record).__name__}", path, number)
        yield number, _valid_unicode(record, path, number)


def _valid_unicode(record: dict[str, Any], path: str, line: int) -> dict[str, Any]:
    """`record`, refused if it holds a string that is not valid Unicode: JSON's ``\\ud800``
    escapes parse, but no tokenizer (and no UTF-8 file) can take them."""
    problem = record_unicode_problem(record)
    if problem:
        raise DataError(problem, path, line)
    return record


def _json_records(text: str, path: str) -> Records:
    """A JSON list of objects (each with the line it starts on); a file of JSON lines is read as such."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i == len(text):
        return
    if text[i] == "{":
        try:
            json.loads(text)
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", path) from None
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several objects: JSON lines under a .json name
                yield from _jsonl_records(text, path)
                return
            raise DataError(f"invalid JSON: {e.msg}", path, e.lineno, e.colno) from None
        raise DataError("expected a JSON list of objects (or one object per line), got a single object", path, 1)
    if text[i] != "[":
        try:
            json.loads(text)
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", path) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", path, e.lineno, e.colno) from None
        raise DataError("expected a JSON list of objects", path, 1)
    i, line, counted = _skip_ws(text, i + 1), 1, 0
    if i < len(text) and text[i] == "]":
        i = len(text) if not text[i + 1:].strip() else i + 1
    while i < len(text):
        line += text.count("\n", counted, i)
        counted = i
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", path, e.lineno, e.colno) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", path, line) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a list of JSON objects, found a {type(record).__name__}", path, line)
        yield line, _valid_unicode(record, path, line)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] == "]":
            rest = _skip_ws(text, i + 1)
            if rest < len(text):
                err = json.JSONDecodeError("Extra data", text, rest)
                raise DataError(f"invalid JSON: {err.msg}", path, err.lineno, err.colno)
            return
        else:
            err = json.JSONDecodeError("Expecting ',' delimiter" if i < len(text) else "Expecting ']'", text, i)
            raise DataError(f"invalid JSON: {err.msg}", path, err.lineno, err.colno)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _csv_records(text: str, path: str, fmt: str, columns: Sequence[str]) -> Records:
    """CSV (quoted fields allowed) or TSV (no quoting: a '"' is text, as in SST-2 and RTE).
    Values are stripped of surrounding whitespace; the header is the first non-blank line."""
    opts = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"delimiter": ","}
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long passages (BoolQ) exceed the 128 KiB default
    try:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True, **opts)
        header: list[str] | None = None
        header_line, previous = 0, 0
        while True:
            start = previous + 1  # a quoted CSV record may span lines: report where it starts
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"malformed {fmt.upper()}: {e}", path, reader.line_num) from None
            previous = reader.line_num
            if not any(v.strip() for v in row):
                continue
            if header is None:
                header, header_line = [h.strip() for h in row], start
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes or "" in header:
                    raise DataError(f"the header needs distinct, non-empty column names; got {header}", path, start)
                for name in columns:
                    if name not in header:
                        raise DataError(f"missing column {name!r} in the header{closest(name, header)} "
                                        f"(available: {', '.join(header)})", path, start)
                continue
            if len(row) != len(header):
                hint = " (a tab inside a value?)" if fmt == "tsv" else ""
                raise DataError(f"{len(row)} values, but the header (line {header_line}) has {len(header)} "
                                f"columns {header}{hint}", path, start)
            yield start, {h: v.strip() for h, v in zip(header, row)}
    finally:
        csv.field_size_limit(old_limit)


def _conll_records(text: str, path: str, tags: Sequence[str] | None) -> Records:
    """``token<TAB>tag`` (or space-separated; the tag is the last column) per line, blank
    lines between sentences, ``-DOCSTART-`` lines skipped. Byte-order marks are deleted
    wherever they are: WNUT-17's dev file has them inside a token and as a final line."""
    allowed = None if tags is None else set(tags)
    tokens: list[str] = []
    labels: list[str] = []
    start = 0
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.replace(BOM, "").rstrip("\r")
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                yield start, {"tokens": tokens, "tags": labels}
            tokens, labels = [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        tag = parts[-1].strip() if len(parts) > 1 else ""
        if not tag:
            raise DataError(f"expected 'token<TAB>tag', found no tag in {line!r}", path, number)
        if not parts[0].strip():
            raise DataError(f"expected 'token<TAB>tag', found no token in {line!r}", path, number)
        if allowed is not None and tag not in allowed:
            raise DataError(f"unknown tag {tag!r}{closest(tag, allowed)}; known tags: {sorted(allowed)}", path, number)
        if not tokens:
            start = number
        tokens.append(parts[0])
        labels.append(tag)
    if tokens:
        yield start, {"tokens": tokens, "tags": labels}


# -- normalisation --------------------------------------------------------------------------
def _normalise(records: Records, path: str, unit: str, fields: dict[str, str], label_field: str,
               labels: list[str] | None, columns: Sequence[str], required: Sequence[str]) -> Examples:
    out, lines = [], []
    for number, record in records:
        for name in columns:
            if name not in record:
                raise DataError(f"missing field {name!r}{closest(name, record)} (available: "
                                f"{', '.join(map(str, record)) or 'none'})", path, number, unit=unit)
        if label_field != "label" and label_field in record:
            record["label"] = record.pop(label_field)
        if fields:
            record = {fields.get(k, k): v for k, v in record.items()}
        if "label" in record:
            if record["label"] is None:
                del record["label"]
            else:
                try:
                    record["label"] = normalise_label(record["label"])
                except TypeError as e:
                    raise DataError(f"field {label_field!r}: {e}", path, number, unit=unit) from None
        problem = label_problem(record, labels, field=repr(label_field)) if labels is not None else None
        if problem:
            raise DataError(problem, path, number, unit=unit)
        for name in required:
            if name not in record:
                raise DataError(f"missing field {name!r}{closest(name, record)} (available: "
                                f"{', '.join(map(str, record)) or 'none'})", path, number, unit=unit)
        out.append(record)
        lines.append(number)
    renamed = {key: column for column, key in fields.items()} | ({"label": label_field} if label_field != "label" else {})
    return Examples(out, path, lines, unit, columns=renamed)


__all__ = ["FORMATS", "DataError", "infer_format", "normalise_label", "read_examples", "read_text"]
