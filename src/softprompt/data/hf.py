"""Hugging Face datasets as examples: ``hf:NAME[/CONFIG][:SPLIT]`` through
``datasets.load_dataset`` (needs the hub, or its cache), and directories written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` through ``datasets.load_from_disk``
(offline). ``datasets`` is imported only when one is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..extras import require

Records = Iterator[tuple[int, dict[str, Any]]]  # (1-based row, raw record)


def parse_hf_path(source: str) -> tuple[str, str | None, str | None]:
    """``hf:NAME[/CONFIG][:SPLIT]`` -> (name, config, split).

    ``hf:glue/sst2:validation`` -> ("glue", "sst2", "validation"); with an owner, three
    parts: ``hf:ORG/NAME/CONFIG``, or ``hf:ORG/NAME/`` for none.
    """
    if not source.startswith("hf:"):
        raise DataError("a Hugging Face source starts with 'hf:' (hf:NAME[/CONFIG][:SPLIT])", source)
    spec, split = source[3:], None
    if ":" in spec:
        spec, _, split = spec.rpartition(":")
        if not split:
            raise DataError("empty split after ':' (hf:NAME[/CONFIG][:SPLIT])", source)
    parts = spec.split("/")
    if len(parts) > 3 or not all(parts[:-1]) or not parts[0]:
        raise DataError("expected hf:NAME[:SPLIT], hf:NAME/CONFIG[:SPLIT] or hf:ORG/NAME/CONFIG[:SPLIT]", source)
    if len(parts) == 1:
        return parts[0], None, split
    if len(parts) == 2:
        return parts[0], parts[1] or None, split
    return f"{parts[0]}/{parts[1]}", parts[2] or None, split


def _datasets():
    return require("datasets", "hf", "reading a Hugging Face dataset (hf:...)")


def hf_records(source: str, split: str | None) -> Records:
    name, config, parsed_split = parse_hf_path(source)
    split = split or parsed_split or "train"
    datasets = _datasets()  # a missing extra is named as such, not as a failed load
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown dataset / config / split: all reported the same way
        raise DataError(f"datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: "
                        f"{type(e).__name__}: {e}", source) from e
    return _rows(dataset)


def disk_split(source: str) -> tuple[str, str] | None:
    """``DIR:SPLIT`` -> (DIR, SPLIT) when DIR is a directory."""
    head, sep, tail = source.rpartition(":")
    return (head, tail) if sep and tail and Path(head).is_dir() else None


def disk_records(source: str, split: str | None) -> Records:
    directory = source
    if not Path(source).is_dir():
        directory, split = disk_split(source)  # type: ignore[misc]
    root = Path(directory)
    if not any((root / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise DataError("is a directory, but not a dataset saved with Dataset.save_to_disk "
                        "(no dataset_dict.json or state.json)", directory)
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as e:
        raise DataError(f"datasets.load_from_disk failed: {type(e).__name__}: {e}", directory) from e
    if hasattr(loaded, "keys"):  # a DatasetDict
        splits = list(loaded.keys())
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise DataError(f"{'no split given' if split is None else f'no split {split!r}'}; this DatasetDict has "
                            f"{splits} (pass split=... or DIR:SPLIT)", directory)
        loaded = loaded[split]
    elif split is not None and getattr(loaded, "split", None) is not None and str(loaded.split) != split:
        raise DataError(f"holds one split ({loaded.split}), not {split!r}", directory)
    return _rows(loaded)


def _rows(dataset: Iterable[dict[str, Any]]) -> Records:
    for number, row in enumerate(dataset, 1):
        yield number, dict(row)


__all__ = ["disk_records", "disk_split", "hf_records", "parse_hf_path"]
