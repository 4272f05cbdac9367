"""LAMA T-REx facts: reading, the seeded train/dev/test split, and LAMA's manual templates.

Facts come without a train split (LAMA is a probe), so each relation's facts are split
60/20/20 by a hash order: ``SHA-256(seed, relation, subject, object)``. Unlike
`random.shuffle`, that order does not depend on the Python version or on the order of
the file's lines, and a fact that occurs twice lands in one split.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, TemplateError
from .readers import read_examples, read_text

FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "dev", "test")


def lama_relations(root: Path) -> list[str]:
    """Relation ids with a facts file ``lama/trex/P*.jsonl`` under `root`, in numeric order."""
    folder = Path(root) / "lama" / "trex"
    found = [p.stem for p in folder.glob("P*.jsonl") if re.fullmatch(r"P\d+", p.stem)] if folder.is_dir() else []
    return sorted(found, key=lambda r: int(r[1:]))


class LamaTemplateError(TemplateError, DataError):
    """A LAMA manual template that cannot be converted: a bad template (`TemplateError`)
    read from a relation file or a recipe (`DataError`); callers catch either."""


def lama_template(manual: str, subject: str = "X", *, causal: bool = False) -> str:
    """LAMA's manual template in softprompt's template language.

    ``"[X] was born in [Y] ."`` -> ``"{X} was born in [MASK] ."``. Braces are escaped,
    and ``[P:n]`` slots pass through, so ``"[P:3] [X] [P:3] [Y]"`` becomes a P-tuning
    template with anchors.

    Args:
        manual: a template with one ``[X]`` (subject) and one ``[Y]`` (object).
        subject: the field name ``[X]`` becomes.
        causal: for a causal LM, which reads the answer at the end: drop what follows ``[Y]``
            (``{X} was born in [MASK]``). Without it, a template with [Y] before [X] (LAMA's
            P1923, ``"[Y] participated in the [X] ."``) is refused by a causal LM's encoder.

    Raises:
        LamaTemplateError: not a string, [X] or [Y] missing or repeated, or (causal) [X]
            after [Y].
    """
    if not isinstance(manual, str):
        raise LamaTemplateError(f"a LAMA template must be a string, got {type(manual).__name__}")
    for slot in ("[X]", "[Y]"):
        count = manual.count(slot)
        if count != 1:
            raise LamaTemplateError(f"LAMA template {manual!r} must contain {slot} exactly once (found {count}): "
                                    "a LAMA template needs one [X] and one [Y]")
    if causal:
        if manual.index("[X]") > manual.index("[Y]"):
            raise LamaTemplateError(f"template {manual!r}: a causal LM cannot see [X] after the answer [Y]")
        manual = manual[: manual.index("[Y]") + 3]
    escaped = manual.replace("{", "{{").replace("}", "}}")
    return escaped.replace("[X]", "{" + subject + "}").replace("[Y]", "[MASK]").strip()


@functools.lru_cache(maxsize=8)
def _relation_templates(path: str, mtime: int) -> dict[str, str]:
    rows = read_examples(path, format="jsonl", required=("relation", "template"))
    return {str(r["relation"]): str(r["template"]) for r in rows}


def read_relation_templates(root: Path) -> dict[str, str]:
    """relation id -> LAMA manual template, from ``lama/relations.jsonl``."""
    path = Path(root) / "lama" / "relations.jsonl"
    if not path.is_file():
        read_text(path)  # raises "no such file"
    return dict(_relation_templates(str(path), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _vocab(path: str, mtime: int) -> frozenset[str]:
    return frozenset(w for w in read_text(path).split("\n") if w.strip())


def common_vocab(root: Path) -> list[str]:
    """LAMA's shared candidate vocabulary (``lama/common_vocab_cased.txt``), in file order."""
    path = Path(root) / "lama" / "common_vocab_cased.txt"
    text = read_text(path)
    return [w for w in text.split("\n") if w.strip()]


def split_facts(facts: Sequence[dict[str, Any]], seed: int = 0,
                fractions: Sequence[float] = FRACTIONS) -> dict[str, list[dict[str, Any]]]:
    """Split one relation's facts into train / dev / test (60/20/20 by default).

    Facts are ordered by ``SHA-256(seed, relation, X, Y)`` (ties by uuid), then cut at
    ``round(0.6 n)`` and ``round(0.8 n)``; a cut that would separate two copies of one fact
    moves past them.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``, the facts themselves (not copies).
    """
    def key(fact: dict[str, Any]) -> str:
        text = "\x1f".join((str(seed), str(fact.get("relation", "")), str(fact["X"]), str(fact["Y"])))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    ordered = sorted(((key(f), str(f.get("uuid", "")), i, f) for i, f in enumerate(facts)), key=lambda t: t[:3])
    n = len(ordered)
    cuts, total = [], 0.0
    for fraction in fractions[:-1]:
        total += fraction
        cut = max(int(total * n + 0.5), cuts[-1] if cuts else 0)
        while 0 < cut < n and ordered[cut][0] == ordered[cut - 1][0]:
            cut += 1
        cuts.append(cut)
    bounds = [0, *cuts, n]
    return {name: [t[3] for t in ordered[bounds[k]: bounds[k + 1]]] for k, name in enumerate(SPLIT_NAMES)}


@functools.lru_cache(maxsize=64)
def _relation_split(path: str, mtime: int, relation: str, manual: str, seed: int,
                    vocab_path: str | None) -> dict[str, tuple[dict[str, Any], ...]]:
    vocab = _vocab(vocab_path, Path(vocab_path).stat().st_mtime_ns) if vocab_path else None
    facts = []
    for row in read_examples(path, format="jsonl", required=("sub_label", "obj_label")):
        if vocab is not None and row["obj_label"] not in vocab:
            continue
        facts.append({"X": row["sub_label"], "Y": row["obj_label"], "relation": relation,
                      "manual_template": manual, "uuid": row.get("uuid", "")})
    return {name: tuple(part) for name, part in split_facts(facts, seed).items()}


def lama_examples(root: Path, relations: Sequence[str], split: str, *, seed: int = 0,
                  common_vocab_only: bool = False) -> list[dict[str, Any]]:
    """The `split` facts of `relations`, as ``{"X", "Y", "relation", "manual_template", "uuid"}``.

    Raises:
        DataError: a missing facts file, a relation without a manual template in
            ``relations.jsonl``, or a malformed fact (file and line).
    """
    root = Path(root)
    templates = read_relation_templates(root)
    vocab_path = root / "lama" / "common_vocab_cased.txt"
    if common_vocab_only and not vocab_path.is_file():
        read_text(vocab_path)
    out: list[dict[str, Any]] = []
    for relation in relations:
        path = root / "lama" / "trex" / f"{relation}.jsonl"
        if not path.is_file():
            read_text(path)
        if relation not in templates:
            raise DataError(f"relation {relation!r} has no manual template", root / "lama" / "relations.jsonl")
        parts = _relation_split(str(path), path.stat().st_mtime_ns, relation, templates[relation], seed,
                                str(vocab_path) if common_vocab_only else None)
        out += [dict(fact) for fact in parts[split]]
    return out


__all__ = [
    "common_vocab",
    "lama_examples",
    "LamaTemplateError",
    "lama_relations",
    "lama_template",
    "read_relation_templates",
    "split_facts",
]
