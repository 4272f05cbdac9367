"""Render examples through a template into token ids with marked virtual slots, and collate
them into a `PromptBatch` (`batch.py`: the typed batch and its (B, S) layout operations).

One row is laid out as

    [leading specials] [items of the template, in order] [trailing specials]

or, when the template has ``[START]`` (preceded by virtual slots only), with the leading
specials at that item instead of first.

where a virtual slot holds a placeholder id and its prompt-table row in `prompt_index`.
Virtual slots are part of the row before padding is added, so they are never placed
before pads. Truncation shortens only placeholders (longest first, from their end).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .architecture import ModelKind, ModelSpec
from .batch import PromptBatch  # also imported from here: the batch was defined in this module
from .errors import ConfigError, EncodingError, InputTooLongError, TemplateError
from .template import Anchor, Mask, Placeholder, Start, Template, Virtual


class TokenIds(tuple):
    """A field's value given as token ids of the model's vocabulary, placed as they are (not
    tokenized): an OpenAI completion's ``prompt`` sent as a list of ids (lm-eval sends them
    so by default). The virtual tokens and the template's own text around the field are
    added as for text."""

    __slots__ = ()


@dataclass
class EncodedRow:
    """One example, unpadded. All lists have the row's length S."""

    input_ids: list[int]
    prompt_index: list[int]  # row of the prompt table at a virtual slot, else -1
    field_index: list[int]  # index into Template.fields for placeholder tokens, else -1
    word_index: list[int]  # word number within a pre-split (list) field, else -1
    answer_index: int  # position whose output answers [MASK], or -1


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a text (e.g. [CLS] / [SEP], <s>, </s>)."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []


class TemplateEncoder:
    """Tokenizes examples through one template for one model.

    Args:
        template: the parsed template.
        tokenizer: a transformers tokenizer.
        spec: the base model's spec (kind, position limit).
        deep_tokens: P of a deep prompt (it takes positions 0..P-1, so real tokens start at P);
            0 for input prompts.
    """

    def __init__(self, template: Template, tokenizer, spec: ModelSpec, deep_tokens: int = 0):
        if tokenizer is None:
            raise ConfigError("encoding needs a tokenizer: pass tokenizer=... to SoftPromptModel")
        self.template = template
        self.tokenizer = tokenizer
        self.spec = spec
        self.deep_tokens = deep_tokens
        self.fields = template.fields
        self.causal = spec.kind is ModelKind.CAUSAL
        lead, trail = special_frame(tokenizer)
        self.lead = lead
        # A causal LM reads its answer / continues generation at the end of the row: no
        # trailing end-of-sequence token, and nothing after the answer slot.
        self.trail = [] if self.causal else trail
        items = list(template.items)
        if self.causal and template.has_mask:
            cut = next(i for i, it in enumerate(items) if isinstance(it, Mask)) + 1
            dropped = [it.name for it in items[cut:] if isinstance(it, Placeholder)]
            if dropped:  # silently dropping an input field would train on rows without it
                raise TemplateError(
                    f"template {template.source!r}: a causal LM answers [MASK] from the tokens before it, "
                    f"so field(s) {dropped} after [MASK] would never be seen; move them before [MASK]"
                )
            items = items[:cut]
        self.items = items
        self.pad_id = self._pad_id()
        self.mask_id = None if self.causal or not template.has_mask else self._mask_id()
        self._probe = tokenizer("x", add_special_tokens=False)["input_ids"]
        self._local = threading.local()  # `pretokenized` memo of the calling thread
        self._anchor_ids = {}

    # -- tokenization helpers -------------------------------------------------
    def _pad_id(self) -> int:
        tok = self.tokenizer
        for value in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if value is not None:
                return int(value)
        return 0

    def _mask_id(self) -> int:
        tok = self.tokenizer
        if tok.mask_token_id is not None:
            return int(tok.mask_token_id)
        sentinel = tok.convert_tokens_to_ids("<extra_id_0>")  # T5's span-corruption mask
        if sentinel is not None and sentinel != tok.unk_token_id:
            return int(sentinel)
        raise EncodingError(
            f"template {self.template.source!r} has [MASK] but tokenizer {type(tok).__name__} has no mask token"
        )

    def tokenize(self, text: str, space_before: bool, *, data: bool = False) -> list[int]:
        """Token ids of `text`; with `space_before`, as it tokenizes after a word boundary.

        Byte-level BPE marks a word boundary in the token itself ("Ġword"); tokenizing
        ``"x " + text`` and dropping the probe's ids gives that form for every tokenizer
        family, since all of them split words at whitespace.

        With `data` (the value of a field), special-token text such as ``"[MASK]"``,
        ``"[SEP]"`` or ``"<|endoftext|>"`` is tokenized as ordinary text: an example's
        content must not be able to add a mask, separator or end-of-text token to the
        row. Anchors are the template author's and keep such tokens special
        (``"{premise} [SEP] {hypothesis}"``).
        """
        if not text:
            return []
        memo = getattr(self._local, "memo", None)
        if data and memo is not None and (text, space_before) in memo:
            return list(memo[(text, space_before)])
        kwargs = {"add_special_tokens": False}
        if data:
            kwargs["split_special_tokens"] = True
        if space_before:
            ids = self.tokenizer("x " + text, **kwargs)["input_ids"]
            if ids[: len(self._probe)] == self._probe:
                return list(ids[len(self._probe) :])
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    @contextmanager
    def pretokenized(self, texts: Iterable[str]) -> Iterator[None]:
        """Tokenize many field values at once for the `encode` calls inside the block.

        A fast tokenizer encodes a list in one call (in parallel where it may), where one
        call per value costs more than the tokenization itself for short texts. Each text
        is tokenized in both forms `tokenize` may need (after a word boundary and not);
        the ids are the ones `tokenize(text, space, data=True)` returns.
        """
        with self.using(self.memo_of(texts)):
            yield

    def memo_of(self, texts: Iterable[str]) -> dict[tuple[str, bool], list[int]]:
        """The ids of `texts` in both forms (`pretokenized`), from two batched calls of the
        tokenizer: for this encoder and every other on the same tokenizer (`using`), so that
        a batch of many tasks tokenizes once, not once per task."""
        texts = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t))
        memo: dict[tuple[str, bool], list[int]] = {}
        try:
            kwargs = {"add_special_tokens": False, "split_special_tokens": True}
            plain = self.tokenizer(texts, **kwargs)["input_ids"] if texts else []
            spaced = self.tokenizer(["x " + t for t in texts], **kwargs)["input_ids"] if texts else []
        except Exception:  # a value the tokenizer refuses: `encode` meets it alone and says which
            plain = spaced = []
        n = len(self._probe)
        for text, ids, probed in zip(texts, plain, spaced):
            memo[(text, False)] = ids
            memo[(text, True)] = probed[n:] if probed[:n] == self._probe else ids
        return memo

    @contextmanager
    def using(self, memo: dict[tuple[str, bool], list[int]]) -> Iterator[None]:
        """`encode` calls inside the block read their texts' ids from `memo` (`memo_of` of an
        encoder on the same tokenizer), in the calling thread."""
        previous = getattr(self._local, "memo", None)
        self._local.memo = memo
        try:
            yield
        finally:
            self._local.memo = previous

    def _anchor(self, item: Anchor, space: bool) -> list[int]:
        key = (item.text, space)
        if key not in self._anchor_ids:
            self._anchor_ids[key] = self.tokenize(item.text, space)
        return self._anchor_ids[key]

    @property
    def max_length(self) -> int | None:
        """Most tokens a row may have (virtual slots included), or None."""
        if self.spec.max_positions is None:
            return None
        return self.spec.max_positions - self.deep_tokens

    # -- one example ----------------------------------------------------------
    def encode(self, example: Mapping[str, Any], *, max_length: int | None = None, index: int | None = None,
               truncate: bool = True) -> EncodedRow:
        """Encode one example.

        Args:
            example: maps each template field to a string, to a list of words
                (pre-split input, e.g. for token classification) or to `TokenIds`.
            max_length: most tokens in the row, virtual slots included (tightened to
                the model's position limit).
            index: the example's number, for error messages.
            truncate: cut over-long fields (longest first); False: refuse them instead.

        Raises:
            EncodingError: a field is missing or not text, or the fixed part of the
                template alone exceeds the length limit.
            InputTooLongError: with ``truncate=False``, the fields do not fit the limit.
        """
        where = f"example {index}" if index is not None else "example"
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
            raise EncodingError(f"max_length must be a positive integer, got {max_length!r}")
        if not isinstance(example, Mapping):
            raise EncodingError(f"{where}: expected a mapping of field names to text, got {type(example).__name__}")
        pieces: list[tuple[str, Any]] = []  # (kind, payload)
        real_before = bool(self.lead)
        # The template's whitespace before an empty field still separates what comes after
        # it: "Review: {a}{b}" with a="" reads "Review: b", not "Review:b".
        carried = False
        for item in self.items:
            if isinstance(item, Virtual):
                pieces.append(("virtual", item))
            elif isinstance(item, Start):
                pieces.append(("start", None))  # counted with the specials; nothing to truncate
            elif isinstance(item, Mask):
                pieces.append(("mask", None))
                real_before, carried = True, False
            elif isinstance(item, Anchor):
                pieces.append(("ids", self._anchor(item, (item.space_before or carried) and real_before)))
                real_before, carried = True, False
            else:
                if item.name not in example:
                    raise EncodingError(
                        f"{where} has no field {item.name!r} used by template {self.template.source!r}; "
                        f"its fields are {sorted(example)}"
                    )
                value = example[item.name]
                space = (item.space_before or carried) and real_before
                field_no = self.fields.index(item.name)
                if isinstance(value, TokenIds):  # already the model's ids: the client's own tokenization
                    pieces.append(("field", (field_no, list(value), [-1] * len(value))))
                elif isinstance(value, str):
                    ids = self.tokenize(value, space, data=True)
                    pieces.append(("field", (field_no, ids, [-1] * len(ids))))
                elif isinstance(value, Sequence) and all(isinstance(w, str) for w in value):
                    ids, words = [], []
                    for w, word in enumerate(value):
                        word_ids = self.tokenize(word, space or w > 0, data=True)
                        ids += word_ids
                        words += [w] * len(word_ids)
                    pieces.append(("field", (field_no, ids, words)))
                else:
                    raise EncodingError(
                        f"{where}: field {item.name!r} must be a string or a list of words, got {type(value).__name__}"
                    )
                real_before = real_before or bool(value)
                carried = (item.space_before or carried) and not value
        self._truncate(pieces, max_length, where, truncate)
        return self._assemble(pieces, where)

    def _truncate(self, pieces: list, max_length: int | None, where: str, allowed: bool = True) -> None:
        model_limit = self.max_length  # the model's positions less the deep prompt's, or None
        if max_length is None and model_limit is None:
            return
        from_max_length = max_length is not None and (model_limit is None or max_length <= model_limit)
        limit = max_length if from_max_length else model_limit
        virtual = anchors = 0
        specials = len(self.lead) + len(self.trail)
        for kind, payload in pieces:
            if kind == "virtual":
                virtual += payload.count
            elif kind == "mask":
                specials += 0 if self.causal else 1
            elif kind == "ids":
                anchors += len(payload)
        fixed = virtual + anchors + specials
        lengths = [len(p[1][1]) if p[0] == "field" else 0 for p in pieces]
        budget = limit - fixed
        if budget < 0 or (budget == 0 and any(lengths)):
            taken = f"the template's virtual tokens ({virtual}), anchors ({anchors}) and special tokens ({specials})"
            if from_max_length:
                used, room = fixed, f"the {limit} positions that max_length={max_length} allows"
                if model_limit is not None:
                    room += f" (the model allows {model_limit})"
            elif self.deep_tokens:  # the deep prompt takes the first positions of the model's range
                taken = f"the deep prompt ({self.deep_tokens}), " + taken
                used = fixed + self.deep_tokens
                room = f"the {self.spec.max_positions} positions the model allows (its position limit)"
            else:
                used, room = fixed, f"the {limit} positions the model allows (its position limit)"
            raise EncodingError(
                f"{where}: {taken} take {used} of {room}, leaving no room for the input fields; "
                "shorten the template or allow more positions"
            )
        excess = sum(lengths) - budget
        if excess > 0 and not allowed:
            raise InputTooLongError(
                f"{where}: the input takes {sum(lengths) + fixed} tokens with the template, over the limit of {limit} "
                f"by {excess}")
        while excess > 0:  # longest first, one token at a time: keeps short fields whole
            longest = max(range(len(lengths)), key=lambda i: lengths[i])
            lengths[longest] -= 1
            excess -= 1
        for i, (kind, payload) in enumerate(pieces):
            if kind == "field" and lengths[i] < len(payload[1]):
                field_no, ids, words = payload
                pieces[i] = ("field", (field_no, ids[: lengths[i]], words[: lengths[i]]))

    def _assemble(self, pieces: list, where: str) -> EncodedRow:
        ids: list[int] = [] if self.template.has_start else list(self.lead)
        prompt = [-1] * len(ids)
        fields = [-1] * len(ids)
        words = [-1] * len(ids)
        answer = -1
        for kind, payload in pieces:
            if kind == "start":  # the leading specials, after the virtual slots before [START]
                ids += self.lead
                prompt += [-1] * len(self.lead)
                fields += [-1] * len(self.lead)
                words += [-1] * len(self.lead)
                continue
            if kind == "virtual":
                ids += [self.pad_id] * payload.count
                prompt += list(range(payload.first, payload.first + payload.count))
                fields += [-1] * payload.count
                words += [-1] * payload.count
                continue
            if kind == "mask":
                if self.causal:
                    if not ids:
                        raise EncodingError(f"{where}: [MASK] is the first token; a causal LM has nothing to read it from")
                    answer = len(ids) - 1  # the next-token distribution here predicts the answer
                    continue
                answer = len(ids)
                chunk, field_no, word_nos = [self.mask_id], -1, [-1]
            elif kind == "ids":
                chunk, field_no, word_nos = payload, -1, [-1] * len(payload)
            else:
                field_no, chunk, word_nos = payload
            ids += chunk
            prompt += [-1] * len(chunk)
            fields += [field_no] * len(chunk)
            words += list(word_nos)
        tail = len(self.trail)
        return EncodedRow(
            input_ids=ids + self.trail,
            prompt_index=prompt + [-1] * tail,
            field_index=fields + [-1] * tail,
            word_index=words + [-1] * tail,
            answer_index=answer,
        )

    # -- a batch --------------------------------------------------------------
    def collate(self, rows: Sequence[EncodedRow], padding_side: str) -> PromptBatch:
        """Pad rows to one length on `padding_side` and stack them into a `PromptBatch`."""
        if not rows:
            raise EncodingError("nothing to encode: the batch is empty")
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(r.input_ids) for r in rows)
        out = {k: [] for k in ("input_ids", "attention_mask", "prompt_index", "field_index", "word_index")}
        answers = []
        for r in rows:
            pad = width - len(r.input_ids)
            seqs = {
                "input_ids": (r.input_ids, self.pad_id),
                "attention_mask": ([1] * len(r.input_ids), 0),
                "prompt_index": (r.prompt_index, -1),
                "field_index": (r.field_index, -1),
                "word_index": (r.word_index, -1),
            }
            for key, (seq, fill) in seqs.items():
                out[key].append([fill] * pad + seq if padding_side == "left" else seq + [fill] * pad)
            shift = pad if padding_side == "left" else 0
            answers.append(r.answer_index + shift if r.answer_index >= 0 else -1)
        return PromptBatch(**{k: torch.tensor(v, dtype=torch.long) for k, v in out.items()},
                           answer_index=torch.tensor(answers, dtype=torch.long),
                           lengths=[len(r.input_ids) for r in rows])
