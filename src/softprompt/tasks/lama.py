"""Knowledge probing (LAMA): fill a cloze template's [MASK] with the object of a fact;
precision@1 over a candidate vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..architecture import ModelKind
from ..errors import ConfigError, EncodingError
from ..transfer import tensor_on, to_device
from .base import Targets, Task
from .scoring import (
    DEFAULT_CHUNK_SIZE,
    answer_space,
    answer_token_ids,
    describe_tokens,
    require_answer_slot,
    row_log_probs,
    sequence_log_probs,
)


def read_candidates(path: str | Path) -> list[str]:
    """One candidate a line (LAMA's ``common_vocab_cased.txt``); blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"candidates file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"candidates file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class KnowledgeProbe(Task):
    """Fill a cloze template with the fact's object: ``{"X": subject, "Y": object}``.

    The template uses ``{X}`` and ``[MASK]`` (`lama_template` converts LAMA's manual
    templates). Scoring is the verbalizer's (`scoring.py`): a masked LM reads the
    candidates' tokens at [MASK]; a causal LM scores each candidate string by the summed
    log-probability of its BPE tokens after the row (teacher forcing, candidates in
    chunks, forwards shared between candidates with common leading tokens; the row's own
    prefix is recomputed for every extended row, not cached).

    Candidates:

    * a list (or the path of a one-word-a-line file such as LAMA's common vocabulary):
      prediction is the best-scoring candidate. A masked LM keeps only candidates that
      are one vocabulary token (LAMA's setting: the shared vocabulary is single-token by
      construction); `dropped` lists the others. Candidates that tokenize alike are
      merged (first spelling kept). A fact whose object is not among the candidates can
      never be right: `metrics` reports the share of facts whose object is covered, and
      LAMA's practice is to filter such facts out beforehand. With ``single_token`` a
      causal LM keeps only one-token candidates too (the P-tuning paper's LAMA-29k
      protocol for GPT: one forward per fact, the argmax over the candidates' tokens).
    * None: the open vocabulary, one token: the argmax of the whole vocabulary at the
      slot, decoded (a causal LM's next token). Objects of several tokens can then never
      be matched; pass a candidate list for causal LMs.

    Loss (P-tuning on LAMA): masked LM: cross-entropy at [MASK] over the whole vocabulary
    against the object's token (the object must be one token); causal LM: the summed NLL
    of the object's tokens given the row, averaged over the batch.

    predict -> ``{"object": str, "top": [the top_k candidates, best first]}``; metrics
    ``precision_at_1``, ``precision_at_k`` (k = top_k), ``coverage`` (with candidates).

    Args:
        candidates: candidate objects, a candidates file, or None (see above).
        subject_field / object_field: the example fields of the subject and the object.
        top_k: how many best candidates `predict` lists.
        single_token: keep only candidates that are one token at the answer slot (always
            so for a masked LM).
        chunk_size: extended rows per forward (causal LMs, multi-token candidates).
    """

    kind = "lama"
    reads = {"logits": "answer"}
    metric = "precision_at_1"
    answer_only = True

    def __init__(self, candidates: Sequence[str] | str | Path | None = None, subject_field: str = "X",
                 object_field: str = "Y", top_k: int = 10, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 single_token: bool = False):
        super().__init__()
        if isinstance(candidates, (str, Path)):
            candidates = read_candidates(candidates)
        if candidates is not None:
            candidates = [str(c).strip() for c in candidates]
            candidates = [c for c in candidates if c]
            if not candidates:
                raise ConfigError("the candidate list is empty")
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.candidates = candidates
        self.subject_field = subject_field
        self.object_field = object_field
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.single_token = bool(single_token)
        self.dropped: list[str] = []
        self._strings: list[str] | None = None  # kept candidates, set by bind
        self._ids: list[list[int]] | None = None
        self._canonical: dict[tuple[int, ...], str] = {}
        self._slot_tokens = None  # text -> token ids at the answer slot, set by bind
        self._decode = None  # token id -> text, set by bind

    # -- binding --------------------------------------------------------------
    def bind(self, model) -> None:
        require_answer_slot(model, "the LAMA probe")
        if self.subject_field not in model.template.fields:
            raise ConfigError(
                f"the LAMA probe fills field {self.subject_field!r} with the subject, but template "
                f"{model.template.source!r} has fields {list(model.template.fields)}"
            )
        # Plain callables, not the model: a Module attribute would put the whole base
        # model into this task's state_dict (saved as its "head").
        encoder, space, tokenizer = model.encoder, answer_space(model), model.tokenizer
        self._slot_tokens = lambda text: encoder.tokenize(text, space, data=True)
        self._decode = lambda token: tokenizer.decode([token]).strip()
        self._canonical = {}
        self.dropped = []
        if self.candidates is None:
            self._strings = self._ids = None
            return
        masked = model.spec.kind is not ModelKind.CAUSAL
        one_token = masked or self.single_token
        unk = model.tokenizer.unk_token_id
        strings, ids_list = [], []
        for c in self.candidates:
            ids = answer_token_ids(model, c, data=True)
            if not ids or (unk is not None and unk in ids) or (one_token and len(ids) != 1):
                self.dropped.append(c)
                continue
            key = tuple(ids)
            if key in self._canonical:
                continue
            self._canonical[key] = c
            strings.append(c)
            ids_list.append(ids)
        if not strings:
            why = "one vocabulary token" if one_token else "tokenizable without the unknown token"
            raise ConfigError(
                f"none of the {len(self.candidates)} candidates is {why} for {type(model.tokenizer).__name__} "
                f"(e.g. {self.candidates[:3]})"
            )
        self._strings, self._ids = strings, ids_list

    def _require_bound(self) -> None:
        if self._slot_tokens is None:
            raise ConfigError("the LAMA probe is not bound to a model: call task.bind(model) first")

    # -- data -----------------------------------------------------------------
    def object_ids(self, model, example: Mapping[str, Any], index: int) -> list[int]:
        if self.object_field not in example:
            raise EncodingError(f"example {index} has no {self.object_field!r} field (the object)")
        obj = example[self.object_field]
        if not isinstance(obj, str) or not obj.strip():
            raise EncodingError(f"example {index}: the object must be a non-empty string, got {obj!r}")
        ids = answer_token_ids(model, obj.strip(), data=True)
        if model.spec.kind is not ModelKind.CAUSAL and len(ids) != 1:
            raise EncodingError(
                f"example {index}: object {obj!r} is {len(ids)} tokens {describe_tokens(model, ids)}; a masked LM "
                "predicts one token at [MASK] (LAMA keeps facts whose object is one token)"
            )
        return ids

    def collate(self, model, examples, *, with_targets=True):
        """``targets["object_ids"]``: (B,) for a masked LM; (B, L) padded with -100 for a causal LM."""
        examples = list(examples)
        batch = model.encode(examples)
        targets: Targets = {}
        if with_targets:
            ids = [self.object_ids(model, e, i) for i, e in enumerate(examples)]
            if model.spec.kind is ModelKind.CAUSAL:
                L = max(len(t) for t in ids)
                table = torch.full((len(ids), L), -100, dtype=torch.long)
                for i, t in enumerate(ids):
                    table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
                targets["object_ids"] = to_device(table, model.device)
            else:
                targets["object_ids"] = tensor_on([t[0] for t in ids], model.device)
        return batch, targets

    # -- model ----------------------------------------------------------------
    def loss(self, model, batch, targets):
        objects = targets["object_ids"]
        if model.spec.kind is not ModelKind.CAUSAL:
            out = model(**batch, logits="answer")
            return F.cross_entropy(out.answer_logits.float(), objects)
        sequences = [[t for t in row if t != -100] for row in objects.tolist()]
        return -row_log_probs(model, batch, sequences, chunk_size=self.chunk_size).mean()

    @torch.no_grad()
    def predict(self, model, batch, out=None):
        self._require_bound()
        out = model(**batch, **self.reads) if out is None else out
        if self._ids is None:  # the open vocabulary, one token
            logits = out.answer_logits.float()  # (B, V)
            top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.tolist()
            return [{"object": self._decode(row[0]), "top": [self._decode(t) for t in row]} for row in top]
        first = out.answer_logits.float().log_softmax(-1)
        scores = sequence_log_probs(model, batch, self._ids, answer_log_probs=first, chunk_size=self.chunk_size)  # (B, C)
        top = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).indices.tolist()
        return [{"object": self._strings[row[0]], "top": [self._strings[t] for t in row]} for row in top]

    def reference(self, example):
        """The gold object, spelt as `predict` would spell it: the kept candidate with the
        same tokens (``"paris"`` for ``"Paris"`` under an uncased tokenizer), or the
        decoded token in open-vocabulary mode."""
        gold = str(example[self.object_field]).strip()
        if self._slot_tokens is None:
            return gold
        ids = tuple(self._slot_tokens(gold))
        if self._ids is None:
            return self._decode(ids[0]) if len(ids) == 1 else gold
        return self._canonical.get(ids, gold)

    def metrics(self, predictions, references):
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        n = len(references)
        hits1 = sum(p["object"] == r for p, r in zip(predictions, references))
        hitsk = sum(r in p.get("top", [p["object"]]) for p, r in zip(predictions, references))
        scores = {"precision_at_1": hits1 / n if n else 0.0, f"precision_at_{self.top_k}": hitsk / n if n else 0.0,
                  "n": n}
        if self._strings is not None:
            kept = set(self._strings)
            scores["coverage"] = sum(r in kept for r in references) / n if n else 0.0
        return scores

    def to_config(self):
        return {"kind": self.kind, "candidates": self.candidates, "subject_field": self.subject_field,
                "object_field": self.object_field, "top_k": self.top_k, "chunk_size": self.chunk_size,
                "single_token": self.single_token}

    @classmethod
    def from_config(cls, config):
        return cls(config.get("candidates"), subject_field=config.get("subject_field", "X"),
                   object_field=config.get("object_field", "Y"), top_k=config.get("top_k", 10),
                   chunk_size=config.get("chunk_size", DEFAULT_CHUNK_SIZE),
                   single_token=config.get("single_token", False))
