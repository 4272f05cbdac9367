"""The template language: where virtual tokens, data fields, anchors and the answer go.

    "[P:3] {text} [P:3] It was [MASK] ."
    "{premise} [P:2] Question: {hypothesis} ? [P:2] Answer: [MASK]"

Grammar (parsed by hand, character by character; nothing is evaluated):

    template    := item*
    item        := virtual | placeholder | mask | start | anchor
    virtual     := "[P]" | "[P:" digits "]"        one or more virtual tokens
    placeholder := "{" name "}"                     a field of the example, name = [A-Za-z_][A-Za-z0-9_]*
    mask        := "[MASK]"                         the answer slot
    start       := "[START]"                        where the tokenizer's leading special tokens go
    anchor      := any other text; "{{" and "}}" are literal braces; a "[" that does
                   not open one of the forms above is literal text

Whitespace between items is remembered (`space_before`) so that BPE tokenizers get the
word boundaries the template shows. Virtual slots have no text and are transparent to
whitespace: the real text is the template with its ``[P:n]`` slots deleted, so in
``"{a} [P:2]{b}"`` a space separates ``{a}`` and ``{b}``, and in ``"[P:3] {text}"`` nothing
comes before ``{text}``.

A row begins with the tokenizer's leading special tokens ([CLS], <s>, BOS), so the virtual
tokens of ``"[P:3] {text}"`` follow them. ``"[P:3] [START] {text}"`` puts them first, before
the leading specials: the layout of HF PEFT, which prepends its prompts to the tokenized
input. Only virtual slots may precede ``[START]``; like them it has no text of its own and
is transparent to whitespace. Without a leading special token the two templates encode the
same row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .errors import TemplateError


@dataclass(frozen=True)
class Virtual:
    """`count` virtual tokens: rows `first .. first + count - 1` of the prompt table."""

    count: int
    first: int


@dataclass(frozen=True)
class Placeholder:
    """A data field: its value is tokenized in place (and is all truncation may shorten)."""

    name: str
    space_before: bool


@dataclass(frozen=True)
class Anchor:
    """Literal text between the other items, tokenized as it stands, never truncated."""

    text: str
    space_before: bool


@dataclass(frozen=True)
class Mask:
    """The answer slot: a mask token (masked LM) or the position read for the next token (causal LM)."""

    space_before: bool


@dataclass(frozen=True)
class Start:
    """Where the tokenizer's leading special tokens go (default: first in the row)."""


START = "[START]"

Item = Union[Virtual, Placeholder, Anchor, Mask, Start]


@dataclass(frozen=True)
class Template:
    """A parsed template.

    Attributes:
        source: the template string as given.
        items: the items in order.
    """

    source: str
    items: tuple[Item, ...]

    @property
    def num_virtual_tokens(self) -> int:
        return sum(i.count for i in self.items if isinstance(i, Virtual))

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the placeholders, in order of first appearance."""
        seen: dict[str, None] = {}
        for item in self.items:
            if isinstance(item, Placeholder):
                seen.setdefault(item.name)
        return tuple(seen)

    @property
    def has_mask(self) -> bool:
        return any(isinstance(i, Mask) for i in self.items)

    @property
    def has_start(self) -> bool:
        """The template places the leading special tokens itself (``[START]``)."""
        return any(isinstance(i, Start) for i in self.items)

    def __str__(self) -> str:
        return self.source


# A sanity bound: no model has positions for more, and it keeps int() away from huge strings.
_MAX_VIRTUAL = 1_000_000


def _is_name_start(c: str) -> bool:
    return c.isascii() and (c.isalpha() or c == "_")


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def parse_template(source: str, *, require_placeholder: bool = True) -> Template:
    """Parse a template string.

    Args:
        source: the template, e.g. ``"[P:3] {text} [P:3] It was [MASK] ."``.
        require_placeholder: refuse a template with no ``{field}`` (it could not see the input).

    Returns:
        The parsed `Template`.

    Raises:
        TemplateError: a syntax error, naming the 1-based column; no placeholder; more
            than one ``[MASK]``; a virtual-token count that is not a positive integer.
    """
    if not isinstance(source, str):
        raise TemplateError(f"template must be a string, got {type(source).__name__}")
    items: list[Item] = []
    text: list[str] = []  # pending anchor characters
    space_pending = False  # whitespace seen since the last real (non-virtual) item
    next_virtual = 0
    masks = 0
    real_seen = False  # a real (non-virtual) item precedes: only then can a space separate
    i, n = 0, len(source)

    def flush_text() -> None:
        nonlocal space_pending, real_seen
        raw = "".join(text)
        text.clear()
        if not raw.strip():
            space_pending = space_pending or bool(raw)
            return
        lead = raw[0].isspace() or space_pending
        items.append(Anchor(text=raw.strip(), space_before=lead and real_seen))
        space_pending = raw[-1].isspace()
        real_seen = True

    def take_space() -> bool:
        nonlocal space_pending, real_seen
        lead = space_pending and real_seen
        space_pending = False
        real_seen = True
        return lead

    while i < n:
        c = source[i]
        if c == "{":
            if source.startswith("{{", i):
                text.append("{")
                i += 2
                continue
            flush_text()
            j = i + 1
            if j >= n or not _is_name_start(source[j]):
                raise TemplateError(
                    "'{' must open a placeholder like {text} (write '{{' for a literal brace)", source, i + 1
                )
            while j < n and _is_name_char(source[j]):
                j += 1
            if j >= n or (source[j] != "}" and "}" not in source[j:]):
                raise TemplateError("unclosed placeholder: missing '}'", source, i + 1)
            if source[j] != "}":
                raise TemplateError(
                    f"invalid character {source[j]!r} in placeholder name", source, j + 1
                )
            items.append(Placeholder(name=source[i + 1 : j], space_before=take_space()))
            i = j + 1
        elif c == "}":
            if source.startswith("}}", i):
                text.append("}")
                i += 2
                continue
            raise TemplateError("unmatched '}' (write '}}' for a literal brace)", source, i + 1)
        elif source.startswith("[MASK]", i):
            flush_text()
            masks += 1
            if masks > 1:
                raise TemplateError("a template takes one [MASK] answer slot; found a second", source, i + 1)
            items.append(Mask(space_before=take_space()))
            i += len("[MASK]")
        elif source.startswith(START, i):
            flush_text()
            if any(isinstance(it, Start) for it in items):
                raise TemplateError(f"a template takes one {START}; found a second", source, i + 1)
            if not all(isinstance(it, Virtual) for it in items):
                raise TemplateError(f"only virtual tokens ([P:n]) may come before {START}: the leading special "
                                    "tokens start the real text", source, i + 1)
            items.append(Start())  # no text: whitespace around it carries over, as for virtual slots
            i += len(START)
        elif source.startswith("[P]", i) or source.startswith("[P:", i):
            flush_text()
            if source.startswith("[P]", i):
                count, end = 1, i + 3
            else:
                close = source.find("]", i)
                # A '[', '{' or '}' before the ']' means this slot was never closed (the ']'
                # found belongs to a later item, as in "[P:3 {text} [MASK]").
                if close < 0 or any(ch in "[{}" for ch in source[i + 3 : close]):
                    raise TemplateError("unclosed virtual-token slot: missing ']'", source, i + 1)
                digits = source[i + 3 : close]
                if not digits.isdigit() or not digits.isascii():
                    raise TemplateError(
                        f"virtual-token count must be a positive integer, got {digits!r}", source, i + 4
                    )
                if len(digits.lstrip("0")) > len(str(_MAX_VIRTUAL)):  # int() of 4,300+ digits raises ValueError
                    raise TemplateError(f"virtual-token count must be at most {_MAX_VIRTUAL}", source, i + 4)
                count, end = int(digits), close + 1
                if count <= 0:
                    raise TemplateError("virtual-token count must be at least 1", source, i + 4)
                if count > _MAX_VIRTUAL:
                    raise TemplateError(f"virtual-token count must be at most {_MAX_VIRTUAL}", source, i + 4)
            # Virtual tokens have no text: whitespace pending before them carries over to
            # the next real item, and they do not count as a real item before it.
            items.append(Virtual(count=count, first=next_virtual))
            next_virtual += count
            i = end
        else:
            text.append(c)
            i += 1
    flush_text()
    template = Template(source=source, items=tuple(items))
    if require_placeholder and not template.fields:
        raise TemplateError(f"template {source!r} has no placeholder such as {{text}}: it would never see the input")
    return template


def default_template(num_virtual_tokens: int, *, deep: bool) -> str:
    """The template used when a method is given only `num_virtual_tokens` (what PEFT does)."""
    return "{text}" if deep else f"[P:{num_virtual_tokens}] {{text}}"
