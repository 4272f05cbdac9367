"""Token classification (NER, BIO tags; the P-tuning v2 setting): a linear head over the
real tokens' last hidden states, word-level labels on each word's first sub-token."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EncodingError
from ..extras import require
from .base import Targets, Task

OUTSIDE = "O"


def first_subtoken_positions(field_index: torch.Tensor, word_index: torch.Tensor, field_no: int,
                             num_words: int) -> torch.Tensor:
    """Column of each word's first sub-token.

    Args:
        field_index, word_index: (B, T) per-token field and word numbers.
        field_no: the pre-split field's number in the template.
        num_words: W, the most words of a row.

    Returns:
        (B, W) the first column holding word w of the field in row b; T where the word
        has no token (truncated away, or a word that tokenizes to nothing, or w beyond
        the row's words).
    """
    B, T = word_index.shape
    mine = (field_index == field_no) & (word_index >= 0) & (word_index < num_words)
    slot = torch.where(mine, word_index, torch.full_like(word_index, num_words))  # W: a dump column
    columns = torch.arange(T, device=word_index.device).expand(B, T)
    first = torch.full((B, num_words + 1), T, dtype=torch.long, device=word_index.device)
    first = first.scatter_reduce(1, slot, columns, reduce="amin", include_self=True)
    return first[:, :num_words]


class TokenClassification(Task):
    """A linear head over the last hidden states of the real tokens (BIO tagging).

    Examples are ``{"tokens": [word, ...], "tags": [tag, ...]}``; the words fill the
    template's `field` placeholder (default template ``"{tokens}"``), which marks each
    sub-token with its word number. Only the first sub-token of a word is labelled
    (-100 on the other sub-tokens, on anchors, specials, virtual slots and pads), and
    a word's predicted tag is the argmax at its first sub-token. A word with no token
    in the row (truncated away by the length limit, or a word that tokenizes to
    nothing) is predicted ``"O"`` and still counted by the metrics: truncation costs
    recall, it is not hidden.

    Metrics: entity-level micro precision / recall / F1 with `seqeval` (default,
    conlleval-style scheme) and word-level accuracy.

    Args:
        tags: the tag set, in a fixed order (the head's output units).
        field: the example field holding the words (a template placeholder).
        tags_field: the example field holding the gold tags.
        dropout: dropout on the hidden states while training.
        max_length: most tokens per row (virtual slots included); default: the model's limit.
    """

    kind = "ner"
    reads = {"output_hidden_states": True, "logits": "none"}
    metric = "f1"
    endpoint = "tag"

    def __init__(self, tags: Sequence[str], field: str = "tokens", tags_field: str = "tags",
                 dropout: float = 0.1, max_length: int | None = None):
        super().__init__()
        tags = [str(t) for t in tags]
        if len(tags) < 2 or len(set(tags)) != len(tags):
            raise ConfigError(f"token classification needs at least two distinct tags, got {tags}")
        if not isinstance(field, str) or not field:
            raise ConfigError(f"field must be a field name, got {field!r}")
        self.tags = tags
        self.field = field
        self.tags_field = tags_field
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout
        self.max_length = max_length
        self._tag_ids = {t: i for i, t in enumerate(tags)}
        self.head: nn.Linear | None = None
        self._field_no: int | None = None

    @property
    def word_field(self) -> str:
        return self.field

    def bind(self, model) -> None:
        fields = model.template.fields
        if self.field not in fields:
            raise ConfigError(
                f"token classification reads the words of field {self.field!r}, but template "
                f"{model.template.source!r} has fields {list(fields)}; add {{{self.field}}} to it"
            )
        self._field_no = fields.index(self.field)
        if self.head is None:
            self.head = nn.Linear(model.spec.hidden_size, len(self.tags)).to(model.device)

    def _require_bound(self) -> None:
        if self.head is None:
            raise ConfigError("the task is not bound to a model: call task.bind(model) first")

    # -- data -----------------------------------------------------------------
    def _words(self, example: Mapping[str, Any], index: int) -> list[str]:
        if not isinstance(example, Mapping) or self.field not in example:
            raise EncodingError(f"example {index} has no {self.field!r} field (a list of words)")
        words = example[self.field]
        if isinstance(words, str) or not isinstance(words, Sequence) or not all(isinstance(w, str) for w in words):
            raise EncodingError(f"example {index}: field {self.field!r} must be a list of words, got {words!r:.80}")
        return list(words)

    def _tag_row(self, example: Mapping[str, Any], index: int, n_words: int) -> list[int]:
        if self.tags_field not in example:
            raise EncodingError(f"example {index} has no {self.tags_field!r} field")
        tags = example[self.tags_field]
        if isinstance(tags, str) or not isinstance(tags, Sequence):
            raise EncodingError(f"example {index}: field {self.tags_field!r} must be a list of tags")
        if len(tags) != n_words:
            raise EncodingError(f"example {index}: {len(tags)} tags for {n_words} words")
        ids = []
        for j, tag in enumerate(tags):
            if tag not in self._tag_ids:
                raise EncodingError(
                    f"example {index}: unknown tag {tag!r} (word {j}, {example[self.field][j]!r}); known tags: {self.tags}"
                )
            ids.append(self._tag_ids[tag])
        return ids

    def collate(self, model, examples, *, with_targets=True):
        """Returns the batch (with ``batch.num_words``, the word count of each example, as an
        attribute: `predict` pads its tag lists to it) and ``targets["labels"]`` (B, T)
        aligned to the real tokens, the tag id at each word's first sub-token, -100 elsewhere."""
        self._require_bound()
        examples = list(examples)
        counts = [len(self._words(e, i)) for i, e in enumerate(examples)]
        batch = model.encode(examples, max_length=self.max_length)
        self.annotate(batch, examples)
        targets: Targets = {}
        if with_targets:
            W = max(counts, default=0)
            tag_ids = torch.full((len(examples), W), -100, dtype=torch.long)
            for i, e in enumerate(examples):
                row = self._tag_row(e, i, counts[i])
                tag_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            field_index = batch.align_to_real_tokens(batch.field_index)  # (B, T)
            word_index = batch.align_to_real_tokens(batch.word_index)
            first = first_subtoken_positions(field_index, word_index, self._field_no, W)  # (B, W)
            T = word_index.shape[1]
            labels = torch.full((len(examples), T + 1), -100, dtype=torch.long, device=word_index.device)
            labels.scatter_(1, first, tag_ids.to(word_index.device))  # absent words land in column T
            targets["labels"] = labels[:, :T]
        return batch, targets

    def annotate(self, batch, examples) -> None:
        batch.num_words = [len(self._words(e, i)) for i, e in enumerate(examples)]

    # -- model ----------------------------------------------------------------
    def logits(self, model, batch, out=None) -> tuple[torch.Tensor, Any]:
        """(B, T, num_tags) for the real tokens, and the model output."""
        self._require_bound()
        out = model(**batch, **self.reads) if out is None else out
        return self.head(self.dropout(out.last_hidden_state.float())), out

    def loss(self, model, batch, targets):
        logits, _ = self.logits(model, batch)
        labels = targets["labels"]
        if not (labels != -100).any():  # every word truncated away: nothing to learn from
            return logits.sum() * 0.0
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def predict(self, model, batch, out=None):
        """One list of word-level tags per row (``"O"`` for words with no token)."""
        logits, out = self.logits(model, batch, out)
        best = logits.argmax(-1)  # (B, T)
        counts = batch.num_words
        if counts is None:  # a batch not built by collate: the words it shows (trailing truncated words lost)
            counts = [int(w.max()) + 1 if (w >= 0).any() else 0 for w in out.word_index]
        W = max(counts, default=0)
        first = first_subtoken_positions(out.field_index, out.word_index, self._field_no, W)  # (B, W)
        padded = torch.cat([best, torch.full_like(best[:, :1], -1)], 1)  # column T: no token
        chosen = padded.gather(1, first).tolist()
        return [[self.tags[t] if t >= 0 else OUTSIDE for t in row[:n]] for row, n in zip(chosen, counts)]

    def reference(self, example):
        return [str(t) for t in example[self.tags_field]]

    def metrics(self, predictions, references):
        metrics = require("seqeval.metrics", "ner", "NER metrics (entity-level F1)")
        accuracy_score, f1_score = metrics.accuracy_score, metrics.f1_score
        precision_score, recall_score = metrics.precision_score, metrics.recall_score

        predictions, references = list(predictions), [list(r) for r in references]
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        # A prediction shorter than its sentence (words the row had no room for) is "O" there.
        aligned = [list(p)[: len(r)] + [OUTSIDE] * (len(r) - len(p)) for p, r in zip(predictions, references)]
        with warnings.catch_warnings():  # seqeval warns on tags outside BIO such as "X"
            warnings.simplefilter("ignore")
            return {
                "f1": float(f1_score(references, aligned, zero_division=0)),
                "precision": float(precision_score(references, aligned, zero_division=0)),
                "recall": float(recall_score(references, aligned, zero_division=0)),
                "accuracy": float(accuracy_score(references, aligned)) if references else 0.0,
                "n": len(references),
            }

    def to_config(self):
        return {"kind": self.kind, "tags": self.tags, "field": self.field, "tags_field": self.tags_field,
                "dropout": self.dropout_p, "max_length": self.max_length}

    @classmethod
    def from_config(cls, config):
        return cls(config["tags"], field=config.get("field", "tokens"), tags_field=config.get("tags_field", "tags"),
                   dropout=config.get("dropout", 0.1), max_length=config.get("max_length"))
