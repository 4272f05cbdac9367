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
    template = Template(source=source, items=_Parser(source).items())
    if require_placeholder and not template.fields:
        raise TemplateError(f"template {source!r} has no placeholder such as {{text}}: it would never see the input")
    return template


class _Parser:
    """One left-to-right pass over a template: each item kind is one method that consumes it
    from position `i` and appends it; anchor text accumulates until the next item."""

    def __init__(self, source: str):
        self.source = source
        self.i = 0
        self.out: list[Item] = []
        self.text: list[str] = []  # pending anchor characters
        self.space_pending = False  # whitespace seen since the last real (non-virtual) item
        self.real_seen = False  # a real (non-virtual) item precedes: only then can a space separate
        self.next_virtual = 0
        self.masks = 0

    def items(self) -> tuple[Item, ...]:
        source = self.source
        while self.i < len(source):
            if source[self.i] == "{":
                self.open_brace()
            elif source[self.i] == "}":
                self.close_brace()
            elif source.startswith("[MASK]", self.i):
                self.mask()
            elif source.startswith(START, self.i):
                self.start()
            elif source.startswith("[P]", self.i) or source.startswith("[P:", self.i):
                self.virtual()
            else:
                self.text.append(source[self.i])
                self.i += 1
        self.flush_text()
        return tuple(self.out)

    def error(self, message: str, column: int) -> TemplateError:
        return TemplateError(message, self.source, column)

    # -- anchors and the whitespace between items -------------------------------------
    def flush_text(self) -> None:
        raw = "".join(self.text)
        self.text.clear()
        if not raw.strip():
            self.space_pending = self.space_pending or bool(raw)
            return
        lead = raw[0].isspace() or self.space_pending
        self.out.append(Anchor(text=raw.strip(), space_before=lead and self.real_seen))
        self.space_pending = raw[-1].isspace()
        self.real_seen = True

    def take_space(self) -> bool:
        """Whether a real item about to be appended is separated from the previous one."""
        lead = self.space_pending and self.real_seen
        self.space_pending = False
        self.real_seen = True
        return lead

    # -- one method per item kind --------------------------------------------------------
    def open_brace(self) -> None:
        source, i, n = self.source, self.i, len(self.source)
        if source.startswith("{{", i):
            self.text.append("{")
            self.i += 2
            return
        self.flush_text()
        j = i + 1
        if j >= n or not _is_name_start(source[j]):
            raise self.error("'{' must open a placeholder like {text} (write '{{' for a literal brace)", i + 1)
        while j < n and _is_name_char(source[j]):
            j += 1
        if j >= n or (source[j] != "}" and "}" not in source[j:]):
            raise self.error("unclosed placeholder: missing '}'", i + 1)
        if source[j] != "}":
            raise self.error(f"invalid character {source[j]!r} in placeholder name", j + 1)
        self.out.append(Placeholder(name=source[i + 1 : j], space_before=self.take_space()))
        self.i = j + 1

    def close_brace(self) -> None:
        if self.source.startswith("}}", self.i):
            self.text.append("}")
            self.i += 2
            return
        raise self.error("unmatched '}' (write '}}' for a literal brace)", self.i + 1)

    def mask(self) -> None:
        self.flush_text()
        self.masks += 1
        if self.masks > 1:
            raise self.error("a template takes one [MASK] answer slot; found a second", self.i + 1)
        self.out.append(Mask(space_before=self.take_space()))
        self.i += len("[MASK]")

    def start(self) -> None:
        self.flush_text()
        if any(isinstance(it, Start) for it in self.out):
            raise self.error(f"a template takes one {START}; found a second", self.i + 1)
        if not all(isinstance(it, Virtual) for it in self.out):
            raise self.error(f"only virtual tokens ([P:n]) may come before {START}: the leading special "
                             "tokens start the real text", self.i + 1)
        self.out.append(Start())  # no text: whitespace around it carries over, as for virtual slots
        self.i += len(START)

    def virtual(self) -> None:
        self.flush_text()
        count, end = (1, self.i + 3) if self.source.startswith("[P]", self.i) else self.virtual_count()
        # Virtual tokens have no text: whitespace pending before them carries over to
        # the next real item, and they do not count as a real item before it.
        self.out.append(Virtual(count=count, first=self.next_virtual))
        self.next_virtual += count
        self.i = end

    def virtual_count(self) -> tuple[int, int]:
        """``[P:n]`` at `i` -> (n, the position after its ``]``)."""
        source, i = self.source, self.i
        close = source.find("]", i)
        # A '[', '{' or '}' before the ']' means this slot was never closed (the ']'
        # found belongs to a later item, as in "[P:3 {text} [MASK]").
        if close < 0 or any(ch in "[{}" for ch in source[i + 3 : close]):
            raise self.error("unclosed virtual-token slot: missing ']'", i + 1)
        digits = source[i + 3 : close]
        if not digits.isdigit() or not digits.isascii():
            raise self.error(f"virtual-token count must be a positive integer, got {digits!r}", i + 4)
        if len(digits.lstrip("0")) > len(str(_MAX_VIRTUAL)):  # int() of 4,300+ digits raises ValueError
            raise self.error(f"virtual-token count must be at most {_MAX_VIRTUAL}", i + 4)
        count = int(digits)
        if count <= 0:
            raise self.error("virtual-token count must be at least 1", i + 4)
        if count > _MAX_VIRTUAL:
            raise self.error(f"virtual-token count must be at most {_MAX_VIRTUAL}", i + 4)
        return count, close + 1


def default_template(num_virtual_tokens: int, *, deep: bool) -> str:
    """The template used when a method is given only `num_virtual_tokens` (what PEFT does)."""
    return "{text}" if deep else f"[P:{num_virtual_tokens}] {{text}}"
