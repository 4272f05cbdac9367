"""Metrics, computed from predictions and references (no model involved)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence


def classification_metrics(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over `labels` (CB's official metrics include macro-F1)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} references")
    n = len(gold)
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / n if n else 0.0
    f1s = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "n": n}


def _normalise(text: str) -> list[str]:
    """SQuAD-style answer normalisation: lowercase, no punctuation or articles."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def generation_metrics(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 (SQuAD normalisation), averaged over examples."""
    em = f1 = 0.0
    for p, g in zip(predicted, gold):
        pt, gt = _normalise(p), _normalise(g)
        em += float(pt == gt)
        common = sum((Counter(pt) & Counter(gt)).values())
        if not pt or not gt:
            f1 += float(pt == gt)
        elif common:
            precision, recall = common / len(pt), common / len(gt)
            f1 += 2 * precision * recall / (precision + recall)
    n = max(len(gold), 1)
    return {"exact_match": em / n, "token_f1": f1 / n, "n": len(gold)}
