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
