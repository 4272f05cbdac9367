"""The template language: what parses to what, what is refused and where, and the config rules."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import softprompt as sp
from softprompt.errors import ConfigError, TemplateError
from softprompt.template import Anchor, Mask, Placeholder, Start, Virtual, default_template, parse_template


# -- the documented examples ------------------------------------------------------


def test_sentiment_template_items():
    t = parse_template("[P:3] {text} [P:3] It was [MASK] .")
    assert t.items == (
        Virtual(count=3, first=0),
        Placeholder(name="text", space_before=False),  # nothing real before it
        Virtual(count=3, first=3),
        Anchor(text="It was", space_before=True),
        Mask(space_before=True),
        Anchor(text=".", space_before=True),
    )
    assert t.num_virtual_tokens == 6
    assert t.fields == ("text",)
    assert t.has_mask
    assert str(t) == "[P:3] {text} [P:3] It was [MASK] ."


def test_entailment_template_items():
    t = parse_template("{premise} [P:2] Question: {hypothesis} ? [P:2] Answer: [MASK]")
    assert t.items == (
        Placeholder(name="premise", space_before=False),
        Virtual(count=2, first=0),
        Anchor(text="Question:", space_before=True),
        Placeholder(name="hypothesis", space_before=True),
        Anchor(text="?", space_before=True),
        Virtual(count=2, first=2),
        Anchor(text="Answer:", space_before=True),
        Mask(space_before=True),
    )
    assert t.num_virtual_tokens == 4
    assert t.fields == ("premise", "hypothesis")
    assert t.has_mask


def test_fields_in_order_of_first_appearance_and_no_mask():
    t = parse_template("{b} and {a} then {b} again [P]")
    assert t.fields == ("b", "a")
    assert not t.has_mask
    assert t.num_virtual_tokens == 1
    assert [i.name for i in t.items if isinstance(i, Placeholder)] == ["b", "a", "b"]


def test_single_p_is_one_token_and_offsets_accumulate():
    t = parse_template("[P] {x} [P:4] [P] y [P:2]")
    assert [i for i in t.items if isinstance(i, Virtual)] == [
        Virtual(1, 0), Virtual(4, 1), Virtual(1, 5), Virtual(2, 6)
    ]
    assert t.num_virtual_tokens == 8


def test_literal_braces():
    t = parse_template("{{json}}: {text} {{{x}}}")
    assert t.items == (
        Anchor(text="{json}:", space_before=False),
        Placeholder(name="text", space_before=True),
        Anchor(text="{", space_before=True),
        Placeholder(name="x", space_before=False),
        Anchor(text="}", space_before=False),
    )
    assert t.fields == ("text", "x")


@pytest.mark.parametrize("literal", ["[CLS]", "[X]", "[SEP]", "[PAD]", "[p:3]", "[MASK", "[", "]", "[P", "P:3]"])
def test_bracket_that_opens_nothing_is_literal(literal):
    t = parse_template(f"{literal} {{text}} [P:2]")
    assert t.items[0] == Anchor(text=literal, space_before=False)
    assert t.items[1] == Placeholder(name="text", space_before=True)
    assert t.num_virtual_tokens == 2
    assert not t.has_mask


def test_anchor_keeps_inner_whitespace_and_glued_items():
    t = parse_template("Review:{text}[MASK]!  and  more")
    assert t.items == (
        Anchor(text="Review:", space_before=False),
        Placeholder(name="text", space_before=False),
        Mask(space_before=False),
        Anchor(text="!  and  more", space_before=False),
    )


def test_virtual_slots_are_transparent_to_whitespace():
    # The real text is the template with the [P:n] slots deleted.
    assert parse_template("{a} [P:2]{b}").items[2] == Placeholder("b", space_before=True)
    assert parse_template("{a}[P:2] {b}").items[2] == Placeholder("b", space_before=True)
    assert parse_template("{a}[P:2]{b}").items[2] == Placeholder("b", space_before=False)
    assert parse_template("{a} [P:2]It").items[2] == Anchor("It", space_before=True)
    # Leading slots: nothing real comes before the first item, so no space.
    assert parse_template("[P:2] Review: {t}").items[1] == Anchor("Review:", space_before=False)
    assert parse_template("  [P:2]  [MASK] {t}").items[1] == Mask(space_before=False)


def test_start_marks_where_the_leading_specials_go():
    t = parse_template("[P:2] [START] [P] {text}")
    assert t.items == (Virtual(2, 0), Start(), Virtual(1, 2), Placeholder("text", space_before=False))
    assert t.has_start and t.num_virtual_tokens == 3
    assert not parse_template("[P:2] {text}").has_start


@pytest.mark.parametrize("source, column, words", [
    ("{text} [START]", 8, "only virtual tokens"),
    ("Review: [START] {text}", 9, "only virtual tokens"),
    ("[P] [START] [START] {text}", 13, r"one \[START\]"),
])
def test_start_only_after_virtual_tokens_and_once(source, column, words):
    with pytest.raises(TemplateError, match=words) as info:
        parse_template(source)
    assert info.value.column == column


def test_default_template():
    assert default_template(5, deep=False) == "[P:5] {text}"
    assert default_template(5, deep=True) == "{text}"


def test_template_without_placeholder_allowed_when_asked():
    t = parse_template("[P:3] It was [MASK]", require_placeholder=False)
    assert t.fields == () and t.num_virtual_tokens == 3 and t.has_mask
    assert parse_template("", require_placeholder=False).items == ()


# -- syntax errors: type, column, and the column in the message --------------------


@pytest.mark.parametrize(
    "source, column, words",
    [
        ("Review: {text", 9, "unclosed placeholder"),
        ("{text [MASK]", 1, "unclosed placeholder"),
        ("a {", 3, "must open a placeholder"),
        ("x {1abc} y", 3, "must open a placeholder"),
        ("x { text}", 3, "must open a placeholder"),
        ("x {te-xt} y", 6, "invalid character '-'"),
        ("{te xt}", 4, "invalid character ' '"),
        ("{text} }", 8, "unmatched '}'"),
        ("{text} a}b", 9, "unmatched '}'"),
        ("{text} [P:0]", 11, "at least 1"),
        ("{text} [P:000]", 11, "at least 1"),
        ("{text} [P:x]", 11, "positive integer, got 'x'"),
        ("{text} [P:-2]", 11, "positive integer, got '-2'"),
        ("{text} [P:2.5]", 11, "positive integer, got '2.5'"),
        ("{text} [P:]", 11, "positive integer, got ''"),
        ("{text} [P:3", 8, "unclosed virtual-token slot"),
        ("[P:3 {text} [MASK]", 1, "unclosed virtual-token slot"),
        ("ab [P:12 cd] {text} [MASK]", 7, "positive integer, got '12 cd'"),
        ("{text} [MASK] [MASK]", 15, "second"),
        ("[MASK]{text}[MASK]", 13, "second"),
        ("{text} [P:1000001]", 11, "at most"),
    ],
)
def test_syntax_errors_name_their_column(source, column, words):
    with pytest.raises(TemplateError) as info:
        parse_template(source)
    err = info.value
    assert err.column == column
    assert err.template == source
    message = str(err)
    assert words in message
    assert f"(column {column})" in message
    # The caret line points at the offending character.
    caret = message.splitlines()[-1]
    assert caret.index("^") - 2 == column - 1


def test_huge_virtual_count_is_a_template_error():
    # int() of a 4,300+-digit string raises ValueError; the parser must not get that far.
    source = "{text} [P:" + "9" * 5000 + "]"
    with pytest.raises(TemplateError, match="at most") as info:
        parse_template(source)
    assert info.value.column == 11


def test_largest_virtual_count_accepted():
    assert parse_template("{t} [P:1000000]").num_virtual_tokens == 1_000_000
    assert parse_template("{t} [P:007]").num_virtual_tokens == 7


def test_no_placeholder_is_refused():
    with pytest.raises(TemplateError, match="no placeholder"):
        parse_template("[P:3] It was [MASK] .")
    with pytest.raises(TemplateError, match="no placeholder"):
        parse_template("{{text}} [P:3]")  # escaped braces are not a placeholder
    with pytest.raises(TemplateError, match="must be a string"):
        parse_template(None)


def test_template_error_is_a_softprompt_error():
    with pytest.raises(sp.SoftPromptError):
        parse_template("{")
    with pytest.raises(ValueError):
        parse_template("{")


# -- the config rules ---------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -10, 2.0, "3", True, 1.5])
@pytest.mark.parametrize("cls", [sp.PromptTuningConfig, sp.PTuningConfig, sp.PrefixTuningConfig, sp.PTuningV2Config])
def test_num_virtual_tokens_must_be_positive_int(cls, n):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        cls(num_virtual_tokens=n).resolve()


def test_config_zero_virtual_tokens_refused():
    with pytest.raises(ConfigError):
        sp.PromptTuningConfig(num_virtual_tokens=0).resolve()


def test_config_count_disagreeing_with_template():
    with pytest.raises(ConfigError, match="4") as info:
        sp.PTuningConfig(num_virtual_tokens=4, template="[P:3] {text}").resolve()
    assert "3" in str(info.value)
    # Agreeing, or left out, is fine: P comes from the template.
    t, n = sp.PTuningConfig(num_virtual_tokens=5, template="[P:3] {text} [P:2]").resolve()
    assert n == 5 and t.num_virtual_tokens == 5
    t, n = sp.PTuningConfig(template="{a} [P:2] {b} [P] [MASK]").resolve()
    assert n == 3 and t.fields == ("a", "b")


def test_input_config_template_without_slots_refused():
    with pytest.raises(ConfigError, match="virtual-token slot"):
        sp.PTuningConfig(num_virtual_tokens=3, template="{text} It was [MASK]").resolve()


@pytest.mark.parametrize("cls", [sp.PTuningV2Config, sp.PrefixTuningConfig])
def test_deep_config_refuses_input_slots(cls):
    with pytest.raises(ConfigError, match=r"\[P:n\]"):
        cls(num_virtual_tokens=2, template="[P:2] {text} It was [MASK]").resolve()
    t, n = cls(num_virtual_tokens=4, template="{text} It was [MASK]").resolve()
    assert n == 4 and t.num_virtual_tokens == 0 and t.has_mask
    with pytest.raises(ConfigError, match="required"):
        cls(template="{text}").resolve()


@pytest.mark.parametrize("cls", [sp.PromptTuningConfig, sp.PTuningConfig])
def test_default_template_for_input_methods(cls):
    t, n = cls(num_virtual_tokens=7).resolve()
    assert n == 7
    assert t.source == "[P:7] {text}"
    assert t.items == (Virtual(7, 0), Placeholder("text", space_before=False))


@pytest.mark.parametrize("cls", [sp.PrefixTuningConfig, sp.PTuningV2Config])
def test_default_template_for_deep_methods(cls):
    t, n = cls(num_virtual_tokens=7).resolve()
    assert n == 7 and t.source == "{text}" and t.num_virtual_tokens == 0


def test_config_with_bad_template_raises_template_error():
    with pytest.raises(TemplateError) as info:
        sp.PTuningConfig(template="[P:3] {text").resolve()
    assert info.value.column == 7


# -- properties ---------------------------------------------------------------------

NAMES = ["text", "premise", "hypothesis", "a", "_b2"]
WORD_CHARS = "".join(c for c in string.printable if c not in "{}[" and not c.isspace())
words = st.text(alphabet=WORD_CHARS, min_size=1, max_size=8)
item_strategy = st.one_of(
    st.tuples(st.just("virtual"), st.integers(1, 4)),
    st.tuples(st.just("placeholder"), st.sampled_from(NAMES)),
    st.tuples(st.just("anchor"), st.lists(words, min_size=1, max_size=3)),
    st.tuples(st.just("mask"), st.none()),
)


def _render(kind, payload) -> str:
    if kind == "virtual":
        return "[P]" if payload == 1 else f"[P:{payload}]"
    if kind == "placeholder":
        return "{" + payload + "}"
    if kind == "anchor":
        return " ".join(payload)
    return "[MASK]"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(item_strategy, min_size=1, max_size=10).filter(
        lambda items: sum(k == "mask" for k, _ in items) <= 1
    ),
    st.lists(st.sampled_from(["", " ", "  "]), min_size=11, max_size=11),
)
def test_generated_templates_round_trip(items, gaps):
    source = "".join(gaps[i] + _render(k, p) for i, (k, p) in enumerate(items)) + gaps[-1]
    t = parse_template(source, require_placeholder=False)
    # Expected items: adjacent anchors merge (their joint whitespace inside), and an
    # anchor glued to an anchor-like rendering is still one anchor.
    # space_before: whitespace since the previous real item, virtual slots being transparent.
    expected: list[tuple[str, object, bool]] = []
    pending = real_seen = False
    for i, (kind, payload) in enumerate(items):
        gap = bool(gaps[i])
        if kind == "virtual":
            expected.append((kind, payload, False))
            pending = pending or gap
            continue
        if kind == "anchor" and expected and expected[-1][0] == "anchor":
            expected[-1] = ("anchor", expected[-1][1] + gaps[i] + " ".join(payload), expected[-1][2])
        else:
            text = " ".join(payload) if kind == "anchor" else payload
            expected.append((kind, text, (pending or gap) and real_seen))
        pending, real_seen = False, True
    assert len(t.items) == len(expected), (source, t.items)
    first = 0
    for item, (kind, payload, space) in zip(t.items, expected):
        if kind == "virtual":
            assert item == Virtual(count=payload, first=first)
            first += payload
            continue
        if kind == "placeholder":
            assert item == Placeholder(name=payload, space_before=space)
        elif kind == "anchor":
            assert item == Anchor(text=payload, space_before=space)
        else:
            assert item == Mask(space_before=space)
    assert t.num_virtual_tokens == sum(p for k, p in items if k == "virtual")
    assert t.has_mask == any(k == "mask" for k, _ in items)
    assert t.fields == tuple(dict.fromkeys(p for k, p in items if k == "placeholder"))


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]{}PMASK:0123 x_-é\n")) , max_size=30) | st.text(max_size=30))
def test_random_strings_parse_or_raise_template_error(source):
    try:
        t = parse_template(source)
    except TemplateError as err:
        if err.column is not None:
            assert 1 <= err.column <= len(source)
        return
    assert t.fields  # require_placeholder held
    assert sum(isinstance(i, Mask) for i in t.items) <= 1
    assert all(i.count >= 1 for i in t.items if isinstance(i, Virtual))
