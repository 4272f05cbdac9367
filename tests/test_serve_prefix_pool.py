"""The prefix pool (`serve/prefix_pool.py`): each task's deep prefix or cached prompt
segment stored once for all of its rows in the decode slots, read by the step's attention
beside each row's own columns. Every row must still equal the row alone, through joins,
leaves, spans dropped and moved, the pool grown, and slots resized."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.serve import PromptBank
from softprompt.serve.decode import Decoder, DecodeRow, Sampling
from softprompt.serve.prefix_pool import PrefixPool

from test_serve_slots import alone, bank_of


def test_spans_are_shared_dropped_moved_and_grown():
    pool = PrefixPool([(2, 3, 3)], rows=4, columns=8, dtype=torch.float32, device=torch.device("cpu"))
    a, b, c = object(), object(), object()

    def prefix(value, length):
        return [torch.full((2, length, 3), float(value))]

    assert not pool.attach(0, a, prefix(1, 3), prefix(-1, 3))
    assert not pool.attach(1, a, prefix(9, 3), prefix(9, 3))  # a's span exists: not written again
    assert not pool.attach(2, b, prefix(2, 4), prefix(-2, 4))
    assert [(s.offset, s.length, s.users) for s in pool.spans.values()] == [(0, 3, {0, 1}), (3, 4, {2})]
    assert torch.equal(pool.keys[0][0, :, 0], torch.tensor([1.0] * 3 + [2.0] * 4 + [0.0]))
    assert (pool.mask[1] == 0).tolist() == [True] * 3 + [False] * 5
    pool.detach(0)
    pool.detach(1)  # a's span is unused now, kept until room is needed
    assert pool.has(a) and (pool.mask[:2] < 0).all()
    assert not pool.attach(3, c, prefix(3, 4), prefix(-3, 4))  # 7 + 4 > 8: a dropped, b moved to the front
    assert not pool.has(a) and [(s.offset, s.users) for s in pool.spans.values()] == [(0, {2}), (4, {3})]
    assert torch.equal(pool.keys[0][1, :, 0], torch.tensor([2.0] * 4 + [3.0] * 4))
    assert (pool.mask[2] == 0).tolist() == [True] * 4 + [False] * 4
    assert pool.attach(0, a, prefix(1, 5), prefix(-1, 5))  # no room even after compaction: grown
    assert pool.columns >= 13 and torch.equal(pool.values[0][0, :, 0], torch.tensor([-2.0] * 4 + [-3.0] * 4 + [-1.0] * 5 + [0.0] * (pool.columns - 13)))
    pool.resize({2: 0, 3: 1, 0: 2}, rows=3)  # slots 2, 3, 0 moved to 0, 1, 2
    assert (pool.mask[0] == 0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert (pool.mask[2] == 0).nonzero().flatten().tolist() == list(range(8, 13))


def wide_bank(family_models, family, lengths):
    """Deep tasks with long prefixes of different lengths (the pool starts at 64 columns)."""
    bank, models, tok = bank_of(family_models, family)
    for i, n in enumerate(lengths):
        torch.manual_seed(100 + i)
        name = f"wide{i}"
        models[name] = sp.SoftPromptModel(bank.base, sp.PTuningV2Config(num_virtual_tokens=n, init_std=0.5,
                                                                          template="Q: {text} A:"), tokenizer=tok).eval()
        bank.add(name, models[name])
    return bank, models, tok


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rows_read_their_tasks_prefix_from_the_pool(family_models, family):
    """Ten rows of six tasks (deep prompts of 6 to 40 positions, a cached prompt segment, a
    prompt with anchors that has no prefix) join and leave through 3 slots with eager and
    fixed slots: the pool grows past its 64 columns and drops spans no row reads; each row
    == alone; the slots hold no prefix column."""
    bank, models, tok = wide_bank(family_models, family, [40, 30, 25])
    plan = [("wide0", "hi", 3), ("deep", "a b c", 5), ("wide1", "one", 2), ("short", "the cast", 6),
            ("wide2", "x y", 4), ("mid", "so it goes", 3), ("wide0", "again", 7), ("wide1", "q", 2),
            ("deep", "fine then", 4), ("wide2", "last one", 3)]
    for graphs in (False, True):
        rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=k)) for t, x, k in plan]
        decoder = Decoder(bank, max_rows=3, graphs=graphs, shared_prefix=True)
        decoder.run(rows)
        for row, (task, text, k) in zip(rows, plan):
            assert row.error is None and row.tokens == alone(models[task], {"text": text}, k, None)[:k], (task, text)
        pool = decoder.slots.pool if graphs else None
        if pool is not None:
            assert pool.columns > 64  # 40 + 30 + 25 do not fit 64 columns
            assert all(not s.users for s in pool.spans.values())  # the run ended: no row reads a span


def test_a_task_is_stored_once_for_all_its_rows(family_models):
    """Three rows of a deep task and two of a task with a cached segment: two spans, one per
    task; the slots' columns hold only the rows' own tokens; the tokens equal the same rows
    with the prefix copied into each row's columns (`shared_prefix=False`)."""
    bank, models, tok = bank_of(family_models, "llama")
    names = ["deep", "short", "deep", "short", "deep"]
    texts = ["one two", "three", "four five six", "seven", "eight"]
    tokens, attended = {}, {}
    for shared in (True, False):
        decoder = Decoder(bank, max_rows=5, graphs=True, shared_prefix=shared)
        rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=6)) for t, x in zip(names, texts)]
        spans = []
        def seen(token, decoder=decoder, shared=shared):
            if not spans:  # the first step: the slot columns row 0 attends, and the pool's spans
                attended[shared] = int((decoder.slots.mask[0] == 0).sum())
                spans.append({s.owner.name: (s.length, set(s.users)) for s in decoder.slots.pool.spans.values()}
                             if shared else None)
            return False

        rows[0].on_token = seen
        decoder.run(rows)
        tokens[shared] = [r.tokens for r in rows]
        if shared:
            assert spans[0] == {"deep": (6, {0, 2, 4}), "short": (2, {1, 3})}
    assert tokens[True] == tokens[False]
    assert attended[False] - attended[True] == 6  # the deep row's 6 prefix columns: in the pool, not its slot
    for row_tokens, task, text in zip(tokens[True], names, texts):
        assert row_tokens == alone(models[task], {"text": text}, 6, None)[:6]


def test_families_without_the_slot_attention_keep_copies(family_models):
    for family in ("gpt2", "mistral"):  # heads not grouped; a sliding window
        bank, models, tok = bank_of(family_models, family)
        assert not Decoder(bank, graphs=False).shared_prefix  # opt-in everywhere
        with pytest.raises(ConfigError, match="shared prefix pool"):
            Decoder(bank, graphs=False, shared_prefix=True)
