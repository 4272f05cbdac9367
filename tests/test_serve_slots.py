"""Decode slots (`serve/slots.py`): the fixed-shape cache the decode step runs on. Rows that
join longer than the running ones (the cache moves right), columns running out (unused ones
dropped, then the buffers grow), slots resized to the rows held: every row's greedy tokens
still equal `generate()` on the row alone. CUDA-graph capture itself needs a GPU: its
equality with the eager step is checked in `bench.serve.throughput` (S1 asserts it)."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.serve import PromptBank
from softprompt.serve.decode import Decoder, DecodeRow, Sampling
from softprompt.serve.prefill import prefill_forward
from softprompt.serve.slots import DecodeSlots

from conftest import CAUSAL

TASKS = {
    "short": lambda: sp.PromptTuningConfig(template="[P:2] {text}", init="vocab"),
    "deep": lambda: sp.PTuningV2Config(num_virtual_tokens=6, template="Q: {text} A:", init_std=0.5),
    "mid": lambda: sp.PTuningConfig(template="{text} [P:3] so", encoder="mlp", encoder_hidden_size=16),
}


class Spy:
    """Counts calls of DecodeSlots methods (the behaviour is unchanged)."""

    def __init__(self, monkeypatch, *names):
        self.calls = {n: [] for n in names}
        for n in names:
            original = getattr(DecodeSlots, n)

            def wrapper(slots, *args, _original=original, _name=n, **kwargs):
                self.calls[_name].append(args)
                return _original(slots, *args, **kwargs)

            monkeypatch.setattr(DecodeSlots, n, wrapper)


def bank_of(family_models, family):
    base, tok = family_models(family)
    bank = PromptBank(base, tok, cache_prompts=True)
    models = {}
    for name, make in TASKS.items():
        torch.manual_seed(len(name))
        models[name] = sp.SoftPromptModel(base, make(), tokenizer=tok).eval()
        bank.add(name, models[name])
    return bank, models, tok


def alone(model, example, k, eos):
    """Greedy tokens of generate() on the row alone, cut at its end of sequence."""
    tokens = model.generate(**model.encode([example]), max_new_tokens=k, do_sample=False)[0].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("family", CAUSAL)
def test_rows_joining_longer_outliving_and_outgrowing_the_cache(family_models, family, monkeypatch):
    """Two slots of 16 columns at first, six rows: rows join longer than the running ones
    (the cache moves right) and need more columns than there are (the buffers grow); a
    row of 44 tokens outlives the others (past Mistral's 32-column window); each row ==
    the row alone."""
    spy = Spy(monkeypatch, "_shift", "_grow")
    bank, models, tok = bank_of(family_models, family)
    eos = tok.eos_token_id
    plan = [("short", "hi", 3), ("mid", "a b c d e f g h i j k l m n o p", 2), ("deep", "ok", 44),
            ("short", "the cast holds it together", 4), ("mid", "x", 1), ("deep", "fine then", 7)]
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=k, eos_token_id=eos)) for t, x, k in plan]
    Decoder(bank, max_rows=2, graphs=False, columns=16).run(rows)
    for row, (task, text, k) in zip(rows, plan):
        assert row.tokens == alone(models[task], {"text": text}, k, eos), (task, text)
    shifts = [args[0] for args in spy.calls["_shift"]]
    assert any(d > 0 for d in shifts) and spy.calls["_grow"]


def test_a_row_past_its_reserved_columns(family_models, monkeypatch):
    """Columns are reserved for at most 256 new tokens at a join: a row of 330 (Llama's
    rotary positions have no limit) makes the step itself drop unused columns and grow."""
    spy = Spy(monkeypatch, "_shift", "_grow")
    bank, models, tok = bank_of(family_models, "llama")
    plan = [("mid", "a b c d e f g h", 2), ("short", "then this", 5), ("deep", "ok", 330)]
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=k)) for t, x, k in plan]
    Decoder(bank, max_rows=2, graphs=False).run(rows)
    for row, (task, text, k) in zip(rows, plan):
        assert row.tokens == alone(models[task], {"text": text}, k, None)[:k]
    assert len(rows[2].tokens) == 330
    assert any(args[0] < 0 for args in spy.calls["_shift"]) and len(spy.calls["_grow"]) >= 1


def test_eager_slots_follow_the_rows_held(family_models, monkeypatch):
    """Eager slots grow to the rows that join (up to max_rows) and shrink when a quarter are
    used (a step costs per slot); rows keep their tokens through the moves."""
    spy = Spy(monkeypatch, "resize")
    bank, models, tok = bank_of(family_models, "llama")
    plan = [("short", "hi", 12)] + [("mid", f"row {i}", 3) for i in range(7)]
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=k)) for t, x, k in plan]
    late = rows[2:]
    decoder = Decoder(bank, max_rows=8, graphs=False, admit=lambda room: [late.pop(0)] if late else [])
    decoder.run(rows[:2])  # the queue hands over one row at a time
    sizes = [args[0] for args in spy.calls["resize"]]
    assert max(sizes) == 8 and sizes[-1] == 2  # grew to hold the joiners, shrank for the one left
    for row, (task, text, k) in zip(rows, plan):
        assert row.tokens == alone(models[task], {"text": text}, k, None)[:k]
    assert decoder.slots is None  # eager slots are given back after a run


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_fixed_slots_serve_run_after_run(family_models, family):
    """Graph mode keeps max_rows slots (and the captured graph) from run to run; on the CPU
    the same fixed slots step eagerly. Runs of different lengths after one another, the
    second starting where the first left its columns: each row == the row alone."""
    bank, models, tok = bank_of(family_models, family)
    decoder = Decoder(bank, max_rows=4, graphs=True)
    for text, k in [("again and again", 20), ("a much longer input than the one before it", 9), ("x", 30)]:
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=k)) for t in TASKS]
        decoder.run(rows)
        assert decoder.slots.rows == 4 and decoder.slots.t == 0  # kept, and emptied
        for row, task in zip(rows, TASKS):
            assert row.tokens == alone(models[task], {"text": text}, k, None)[:k], (task, text)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_slot_attention_equals_the_models_own(family_models, family, monkeypatch):
    """The decode step's attention (`attention.slot_attention`: the query heads of a K/V head
    as query rows, no repeated K/V) equals transformers' SDPA attention on the same one-token
    queries, slot buffers and additive mask, layer by layer of a real model."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from softprompt import attention as attn
    from softprompt.attention import slot_attention

    products_of = attn.packed_products
    base, _ = family_models(family)
    attention = base.model.layers[0].self_attn
    groups = attention.num_key_value_groups
    assert groups > 1  # the grouped-head case is what the packed path is for
    g = torch.Generator().manual_seed(0)
    R, H_kv, C, D = 5, base.config.num_key_value_heads, 24, attention.head_dim
    query = torch.randn(R, H_kv * groups, 1, D, generator=g)
    key, value = torch.randn(2, R, H_kv, C, D, generator=g)
    mask = torch.where(torch.rand(R, 1, 1, C, generator=g) < 0.3, torch.finfo(query.dtype).min, 0.0)
    mask[..., -1] = 0.0  # every row sees its newest column
    ours, _ = slot_attention(attention, query, key, value, mask, scaling=attention.scaling)
    theirs, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert ours.shape == (R, 1, H_kv * groups, D)
    # compiled, the packed attention is two products around a softmax (`packed_products`): the same values
    torch._dynamo.reset()
    traced = []
    monkeypatch.setattr(attn, "packed_products", lambda *a: traced.append(1) or products_of(*a))
    compiled = torch.compile(lambda *a: slot_attention(attention, *a, scaling=attention.scaling)[0], fullgraph=True)
    torch.testing.assert_close(compiled(query, key, value, mask), theirs, atol=1e-5, rtol=1e-4)
    assert traced  # the compiled graph holds the products, not SDPA
    packed = query.reshape(R, H_kv, groups, D)
    products = products_of(packed, key, value, mask, attention.scaling).reshape(R, 1, H_kv * groups, D)
    torch.testing.assert_close(products, theirs, atol=1e-6, rtol=1e-5)


def test_decode_steps_run_the_packed_slot_attention(family_models, monkeypatch):
    """Decoding gives the model the slot attention (transformers' attention interface): every
    decode step calls it with one-token queries (one call per layer), the prefill's longer
    queries go through it to SDPA; GPT-2 (no grouped K/V heads) keeps its own."""
    from transformers import AttentionInterface

    from softprompt import attention as attn

    calls = []

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return attn.slot_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attn.SLOT_ATTENTION, spy)
    bank, models, tok = bank_of(family_models, "llama")
    rows = [DecodeRow(t, {"text": "one two"}, Sampling(max_new_tokens=4)) for t in TASKS]
    Decoder(bank, max_rows=4, graphs=True).run(rows)
    layers = bank.base.config.num_hidden_layers
    assert bank.base.config._attn_implementation == attn.SLOT_ATTENTION
    assert calls.count(1) == 3 * layers  # 3 steps after the prefill's first token
    assert len(calls) > 3 * layers  # the prefill's forwards, through the same function
    for row, task in zip(rows, TASKS):
        assert row.tokens == alone(models[task], {"text": "one two"}, 4, None)[:4]
    gpt2, _ = bank_of(family_models, "gpt2")[0].base, None
    assert not attn.use_slot_attention(gpt2) and gpt2.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family, siblings", [("llama", False), ("mistral", False), ("llama", True), ("qwen2", True)])
def test_compiled_step_gives_the_rows_alone(family_models, family, siblings):
    """The decode step's forward compiled with `torch.compile` (as on a GPU before capture):
    rows joining and leaving, run after run, each == the row alone; also with the weights
    frozen and each layer's Q/K/V and gate/up run as one product (`sibling_products`)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    bank, models, tok = bank_of(family_models, family)
    decoder = Decoder(bank, max_rows=4, graphs=True, compile=True, sibling_products=siblings)
    for text, k in [("again and again", 12), ("a much longer input than the one before it", 5)]:
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=k + i)) for i, t in enumerate(TASKS)]
        decoder.run(rows)
        for row, task, i in zip(rows, TASKS, range(3)):
            assert row.tokens == alone(models[task], {"text": text}, k + i, None)[: k + i], (task, text)
    step = DecodeSlots._frozen_scores if siblings else DecodeSlots._scores
    assert compiled_graphs(step) >= 1 and compiled_graphs(prefill_forward) >= 1  # both compiled
    # two fused products a layer in each compiled version of the step, none without the option
    layers = bank.base.config.num_hidden_layers
    assert counters["inductor"]["sibling_products"] == 2 * layers * compiled_graphs(step) * siblings


def compiled_graphs(fn) -> int:
    """How many compiled versions of `fn`'s code dynamo holds (one per shape or guard set)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def test_compiled_slots_growing_compile_at_most_twice(family_models):
    """Columns that grow change the buffers' shapes: the step compiles once for the first
    shape and once more with the column count symbolic (torch.compile's automatic dynamic
    shapes), never again however often they grow (a compile of a 1B step is ~20 s on a GPU);
    rows == alone throughout."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=3, graphs=True, compile=True)
    sizes = []
    for k in (8, 70, 140):  # each run's budget needs more columns than the last: 64, 128, 192
        rows = [DecodeRow(t, {"text": "grow"}, Sampling(max_new_tokens=k)) for t in TASKS]
        decoder.run(rows)
        sizes.append(decoder.slots.columns)
        for row, task in zip(rows, TASKS):
            assert row.tokens == alone(models[task], {"text": "grow"}, k, None)[:k], (task, k)
    assert sizes[0] < sizes[1] < sizes[2]
    assert decoder.slots._forward is not decoder.slots._scores
    assert compiled_graphs(DecodeSlots._scores) == 2


def test_compiled_prefill_serves_joins_of_any_size_with_few_compiles(family_models):
    """Joins of 1 to 3 rows of different lengths and prompt kinds (input, deep, both in one
    join) through the compiled prefill (dynamic shapes): each row == alone, and three
    compiled versions serve them all (each compile of a 1B prefill costs tens of seconds
    on a GPU; one per join shape would stall a server for minutes)."""
    torch._dynamo.reset()
    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=3, graphs=True, compile=True)
    joins = [["short"], ["deep", "mid"], ["short", "deep", "mid"], ["mid"], ["deep"], ["short", "mid"],
             ["deep", "deep", "short"]]
    for i, names in enumerate(joins):
        text = " ".join(["word"] * (2 + 3 * i))
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=3)) for t in names]
        decoder.run(rows)
        for row, task in zip(rows, names):
            assert row.tokens == alone(models[task], {"text": text}, 3, None)[:3], (task, text)
    assert decoder.prefill.compiled  # still compiled
    assert compiled_graphs(prefill_forward) == 3  # one row; more rows with a prefix cache; without


def test_regionally_compiled_prefill_and_step_give_the_rows_alone(family_models):
    """``compile={"regional": True}``: the joins' forward and the decode step run the base's
    blocks compiled (`serve.compiled`, `regions.view`) instead of the whole forward or step:
    joins of 1 to 3 rows of different lengths and prompt kinds, each row == alone; neither the
    forward nor the step is compiled, the block's code is."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch._dynamo.reset()
    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=3, graphs=True, compile={"regional": True})
    for i, names in enumerate([["short"], ["deep", "mid"], ["short", "deep", "mid"], ["deep"]]):
        text = " ".join(["word"] * (2 + 3 * i))
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=3)) for t in names]
        decoder.run(rows)
        for row, task in zip(rows, names):
            assert row.tokens == alone(models[task], {"text": text}, 3, None)[:3], (task, text)
    assert decoder.prefill.compiled
    assert compiled_graphs(prefill_forward) == 0 and compiled_graphs(LlamaDecoderLayer.forward) >= 1
    assert compiled_graphs(DecodeSlots._scores) == 0 and decoder.slots._model is not bank.base


def test_the_engine_passes_its_compile_option_to_the_decoder(family_models):
    from softprompt.serve import Engine

    bank, models, tok = bank_of(family_models, "llama")
    for option in (False, True):
        engine = Engine(bank, compile=option)
        engine.generate("short", ["one"], max_new_tokens=2)
        assert engine._decoder.compile is option


def test_a_step_that_cannot_be_compiled_runs_uncompiled(family_models, monkeypatch, caplog):
    """A compiler failure (no C++ compiler, no Triton, a family dynamo cannot trace) costs
    speed, not requests: the step runs uncompiled, rows == alone, one warning."""
    import torch._dynamo

    def broken(fn, **kwargs):
        def fails(*args, **kw):
            raise torch._dynamo.exc.BackendCompilerFailed(fn, RuntimeError("no compiler here"))
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    bank, models, tok = bank_of(family_models, "llama")
    rows = [DecodeRow(t, {"text": "one two"}, Sampling(max_new_tokens=5)) for t in TASKS]
    decoder = Decoder(bank, max_rows=4, graphs=True, compile=True)
    decoder.run(rows)
    for row, task in zip(rows, TASKS):
        assert row.error is None and row.tokens == alone(models[task], {"text": "one two"}, 5, None)[:5]
    assert decoder.slots._forward == decoder.slots._scores and not decoder.prefill.compiled
    for part in ("decode step", "prefill"):  # one warning each
        assert sum(r.message.startswith(f"{part} not compiled") for r in caplog.records) == 1, part


@pytest.mark.parametrize("family", CAUSAL)
def test_prefill_lm_head_reads_a_contiguous_last_column(family_models, family):
    """The prefill asks for the last column's logits: the LM head is given a contiguous
    (B, 1, D) (an int ``logits_to_keep`` hands it a view whose rows lie a sequence apart,
    which cuBLAS ran 50x slower than needed on a GPU), and the logits equal those of the int
    and of the full forward at that column."""
    from softprompt import inject

    bank, models, tok = bank_of(family_models, family)
    base = bank.base
    rows = [DecodeRow(n, {"text": t}, Sampling(max_new_tokens=2))
            for n, t in (("deep", "a b c d"), ("short", "e"), ("mid", "f g"))]
    decoder = Decoder(bank, max_rows=3)
    inputs_of = decoder.prefill.inputs(rows)
    inputs = inputs_of()
    length = inputs["inputs_embeds"].shape[1]
    assert torch.equal(inputs["logits_to_keep"], torch.tensor([length - 1]))
    seen = []
    hook = base.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            indexed = base(**inputs).logits
            as_int = base(**{**inputs_of(), "logits_to_keep": 1}).logits
            full = base(**{**inputs_of(), "logits_to_keep": 0}).logits
    finally:
        hook.remove()
    assert seen[0].shape == (3, 1, base.config.hidden_size) and seen[0].is_contiguous()
    assert not seen[1].is_contiguous()  # what the int gives: the case the index avoids
    torch.testing.assert_close(indexed, as_int)  # the same numbers (a contiguous product may round differently)
    torch.testing.assert_close(indexed, full[:, -1:])
    assert inject.last_columns(1, 1, torch.device("cpu")) == 1  # one column: already contiguous


def test_warm_up_compiles_what_later_joins_need(family_models):
    """`warm_up` runs joins of one and two rows for a task whose rows start with a prefix
    (here the deep prompt or the cached input prompt) and one whose rows do not (P-tuning's
    prompt after the text): the joins that follow, of any size and mix, compile nothing
    more, and each row still equals the row alone."""
    from softprompt.serve import Engine
    from softprompt.serve.warmup import warm_decoder, warm_up

    torch._dynamo.reset()
    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=3, graphs=True, compile=True)
    ran = warm_decoder(decoder)
    assert sorted(bank[t].deep for t in ran) == [False, True] and "mid" in ran
    versions = compiled_graphs(prefill_forward), compiled_graphs(DecodeSlots._scores)
    assert versions == (4, 1)  # one row and more, with a prefix and without; the step at its slots
    for i, names in enumerate([["deep", "mid", "short"], ["mid"], ["short"], ["deep", "short"], ["mid", "mid"]]):
        text = " ".join(["word"] * (1 + 4 * i))
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=3)) for t in names]
        decoder.run(rows)
        for row, task in zip(rows, names):
            assert row.tokens == alone(models[task], {"text": text}, 3, None)[:3], (task, text)
    assert (compiled_graphs(prefill_forward), compiled_graphs(DecodeSlots._scores)) == versions
    engine = Engine(bank, max_batch_rows=3)
    assert warm_up(engine) == ran and engine.decoder.steps > 0  # the engine's decoder, made and run


def test_a_join_budget_lets_running_rows_step_between_groups(family_models):
    """`max_join_tokens`: waiting rows join in groups whose padded tokens (rows x longest
    row) fit the budget (a longer row alone), and the rows already decoding take a step
    between two groups; every row still equals the row alone."""
    from softprompt.serve import decode

    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=6, max_join_tokens=24)
    events = []
    join, step = decoder._join, decoder._step
    decoder._join = lambda rows: (events.append(("join", [decode._length(r) for r in rows])), join(rows))[1]
    decoder._step = lambda: (events.append(("step",)), step())[1]
    names = ["short", "deep", "mid", "short", "deep", "mid"]
    texts = [" ".join(["word"] * (3 + 2 * i)) for i in range(len(names))]
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=6), encoded=models[t].encoder.encode({"text": x}))
            for t, x in zip(names, texts)]
    decoder.run(rows)
    joins = [e[1] for e in events if e[0] == "join"]
    assert sorted(n for j in joins for n in j) == sorted(decode._length(r) for r in rows)
    assert len(joins) >= 3 and all(len(j) == 1 or len(j) * max(j) <= 24 for j in joins), joins
    kinds = [e[0] for e in events]
    first_step = kinds.index("step")
    assert kinds[first_step:].count("join") == len(joins) - 1  # after the first group, every join follows a step
    assert all(kinds[i - 1] == "step" for i, k in enumerate(kinds) if k == "join" and i > first_step)
    for row, task, text in zip(rows, names, texts):
        assert row.tokens == alone(models[task], {"text": text}, 6, None)[:6], (task, text)
