"""What a refused command leaves behind: the whole file tree under a folder, hidden names
and temporary files included, as path -> content hash, so a test can assert that a
refusal wrote, removed and half-wrote nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too): relative path -> sha256 of the file, or
    ``"dir"``."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        key = str(path.relative_to(root))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What differs between two `tree`s, one line per path (empty: nothing changed)."""
    lines = [f"+ {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"- {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"~ {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines
