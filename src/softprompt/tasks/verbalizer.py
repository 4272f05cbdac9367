"""Verbalizer classification (P-tuning v1 / PET): labels scored by their words at [MASK]."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..architecture import ModelKind
from ..errors import ConfigError
from .labels import LabelTask
from .scoring import DEFAULT_CHUNK_SIZE, answer_token_ids, describe_tokens, require_answer_slot, sequence_log_probs

AGGREGATES = ("logsumexp", "max")


class Verbalizer(LabelTask):
    """Classify by reading label words at the template's answer slot; no head of its own.

    Each label has one or more label words. A word's score is log p(word | row) at
    [MASK]: a masked LM reads the mask token's output; a causal LM reads the next-token
    distribution at the end of the row (its template is cut at [MASK]) and scores a
    word of several BPE tokens by the summed log-probability of its tokens, teacher
    forced (see `scoring.py`). A label's score combines its words' scores:

    * ``logsumexp`` (default): log of the summed probability of the label's words, i.e.
      the probability that the slot holds *any* of them. For single-token words these
      are disjoint events, so it is exactly the label's mass at the slot.
    * ``max``: the best word only.

    The loss is PET's: cross-entropy over the label scores (log-softmax over the whole
    vocabulary at the slot, gathered at the label words, then softmax over labels).

    Args:
        label_words: label -> its words (a string is one word), in a fixed label order.
        aggregate: ``logsumexp`` or ``max``.
        chunk_size: extended rows per forward when scoring multi-token words.

    Raises (in `bind`):
        ConfigError: the template has no [MASK]; a word tokenizes to nothing or to the
            unknown token; a masked LM's word is not one vocabulary token (a masked LM
            fills one [MASK] with one token, so multi-token words are refused rather
            than scored approximately); two labels share a word.
        UnsupportedModelError: an encoder-decoder or a model without an LM head.
    """

    kind = "verbalizer"
    reads = {"logits": "answer"}
    metric = "accuracy"
    answer_only = True

    def __init__(self, label_words: Mapping[str, Sequence[str] | str], aggregate: str = "logsumexp",
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        if not isinstance(label_words, Mapping) or len(label_words) < 2:
            raise ConfigError(f"a verbalizer needs words for at least two labels, got {label_words!r}")
        words: dict[str, list[str]] = {}
        for label, ws in label_words.items():
            ws = [ws] if isinstance(ws, str) else list(ws)
            if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                raise ConfigError(f"label {label!r}: label words must be non-empty strings, got {ws!r}")
            words[str(label)] = [w.strip() for w in ws]
        if len(words) != len(label_words):
            raise ConfigError(f"labels must be distinct, got {list(label_words)}")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.label_words = words
        self.labels = list(words)
        self.aggregate = aggregate
        self.chunk_size = chunk_size
        self.word_ids: list[list[int]] | None = None  # set by bind, one entry per word
        self._word_label: torch.Tensor | None = None
        self._label_index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- binding --------------------------------------------------------------
    def bind(self, model) -> None:
        require_answer_slot(model, "the verbalizer")
        masked = model.spec.kind is not ModelKind.CAUSAL
        tok = model.tokenizer
        unk = tok.unk_token_id
        ids_list, owner, seen = [], [], {}
        for li, (label, words) in enumerate(self.label_words.items()):
            for word in words:
                ids = answer_token_ids(model, word)
                if not ids:
                    raise ConfigError(f"label {label!r}: label word {word!r} tokenizes to nothing with {type(tok).__name__}")
                if unk is not None and unk in ids:
                    raise ConfigError(
                        f"label {label!r}: label word {word!r} is not in the vocabulary of {type(tok).__name__} "
                        f"(tokens {describe_tokens(model, ids)}); choose another word"
                    )
                if masked and len(ids) != 1:
                    raise ConfigError(
                        f"label {label!r}: label word {word!r} is {len(ids)} tokens {describe_tokens(model, ids)} for "
                        f"{type(tok).__name__}; a masked LM fills [MASK] with one token, so each label word must be "
                        "a single vocabulary token (multi-token words need a causal LM)"
                    )
                key = tuple(ids)
                if key in seen and seen[key][0] == label:
                    continue  # two spellings of one token sequence: count its mass once
                if key in seen:
                    raise ConfigError(
                        f"label word {word!r} of label {label!r} tokenizes like {seen[key][1]!r} of label "
                        f"{seen[key][0]!r}: the labels could not be told apart"
                    )
                seen[key] = (label, word)
                ids_list.append(ids)
                owner.append(li)
        self.word_ids = ids_list
        self._word_label = torch.tensor(owner, dtype=torch.long)
        self._label_index = {}

    def _require_bound(self) -> None:
        if self.word_ids is None:
            raise ConfigError("the verbalizer is not bound to a model: call task.bind(model) first")

    # -- scores ---------------------------------------------------------------
    def word_scores(self, model, batch, out=None) -> torch.Tensor:
        """(B, W) log p(word | row) of every label word, in `word_ids` order (`out`: a
        forward over `batch` with answer logits, reused for the words' first tokens)."""
        self._require_bound()
        first = None if out is None else out.answer_logits.float().log_softmax(-1)
        return sequence_log_probs(model, batch, self.word_ids, answer_log_probs=first, chunk_size=self.chunk_size)

    def scores(self, model, batch, out=None) -> torch.Tensor:
        """(B, num_labels) label log-scores (not normalised over labels)."""
        words = self.word_scores(model, batch, out)  # (B, W)
        index, present = self._label_words(words.device)  # (L, K) word columns per label, K = most words of a label
        if index.shape[1] == 1:  # one word per label
            return words[:, index[:, 0]]
        grouped = words[:, index].masked_fill(~present, float("-inf"))  # (B, L, K)
        return grouped.logsumexp(-1) if self.aggregate == "logsumexp" else grouped.max(-1).values

    def _label_words(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each label's word columns, padded: (L, K) indices and (L, K) which are real,
        built once per device (no host-device traffic in a training step)."""
        cached = self._label_index.get(device)
        if cached is None:
            owner = self._word_label.tolist()
            columns = [[w for w, o in enumerate(owner) if o == li] for li in range(len(self.labels))]
            K = max(len(c) for c in columns)
            index = torch.tensor([c + [c[0]] * (K - len(c)) for c in columns], dtype=torch.long)
            present = torch.tensor([[True] * len(c) + [False] * (K - len(c)) for c in columns])
            cached = self._label_index[device] = (index.to(device), present.to(device))
        return cached

    def to_config(self):
        return {"kind": self.kind, "label_words": self.label_words, "aggregate": self.aggregate,
                "chunk_size": self.chunk_size}

    @classmethod
    def from_config(cls, config):
        return cls(config["label_words"], aggregate=config.get("aggregate", "logsumexp"),
                   chunk_size=config.get("chunk_size", DEFAULT_CHUNK_SIZE))
