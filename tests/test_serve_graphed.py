"""Short joins padded to buckets of rows and length (`serve/graphed.py`), the shapes the
decoder's prefill graphs are captured for. The CUDA graphs themselves need a GPU (their
first tokens against the eager prefill's are checked by `bench.probe.prefill`); the padded
forward they record runs here eagerly, on the CPU: each row must equal the row alone."""

from __future__ import annotations

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.serve.decode import Decoder, DecodeRow, Sampling
from softprompt.serve.graphed import LENGTH_BUCKETS, ROW_BUCKETS, PrefillGraphs, bucket
from softprompt.serve.prefill import Prefill

from test_serve_slots import alone, bank_of

PADDABLE = ("gpt2", "llama", "qwen2")


def test_buckets():
    assert [bucket(n, ROW_BUCKETS) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert [bucket(n, LENGTH_BUCKETS) for n in (1, 16, 17, 49, 97, 129, 300, 512, 513)] == [16, 16, 32, 64, 112, 160, 320, 512, None]


def test_joins_beyond_the_token_budget_are_not_padded(family_models):
    bank, models, tok = bank_of(family_models, "llama")
    graphs = PrefillGraphs(bank, max_tokens=256, capture=False)
    assert graphs.shape(3, 20) == (4, 32)
    assert graphs.shape(8, 32) == (8, 32)  # 256 padded tokens: in
    assert graphs.shape(5, 40) is None  # 8 x 48 > 256: the caller's eager prefill
    assert graphs.shape(1, 600) is None  # longer than the longest bucket
    graphs.enabled = False
    assert graphs.shape(1, 1) is None


@pytest.mark.parametrize("family", PADDABLE)
def test_padded_joins_give_each_row_what_it_gets_alone(family_models, family, monkeypatch):
    """Joins of 1, 2, 3 and 5 rows (padded to 1, 2, 4 and 8 rows and to 16 or 32 columns)
    of input prompts, P-tuning with anchors, deep prompts and all three mixed: each row's
    greedy tokens equal generate() on the row alone, and every join went through the
    padded forward."""
    bank, models, tok = bank_of(family_models, family)
    calls = []
    original = PrefillGraphs.__call__
    monkeypatch.setattr(PrefillGraphs, "__call__", lambda self, batch: calls.append(batch) or original(self, batch))
    decoder = Decoder(bank, max_rows=5, graphs=False, padded_prefill=True)
    joins = [["deep"], ["short", "mid"], ["mid", "deep", "short"], ["deep", "short", "deep", "mid", "short"]]
    for i, names in enumerate(joins):
        texts = [" ".join(["word"] * (1 + 2 * i + 3 * j)) for j in range(len(names))]
        rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=4)) for t, x in zip(names, texts)]
        decoder.run(rows)
        for row, task, text in zip(rows, names, texts):
            assert row.error is None and row.tokens == alone(models[task], {"text": text}, 4, None)[:4], (task, text)
    assert len(calls) == len(joins)


@pytest.mark.parametrize("family", PADDABLE)
def test_a_padded_join_hands_over_what_the_eager_prefill_does(family_models, family):
    """Scores, the attention mask, next positions and the attended keys and values of a
    padded join equal the unpadded prefill's (the pad columns and rows it added are gone)."""
    bank, models, tok = bank_of(family_models, family)
    rows = [DecodeRow(t, {"text": x}, Sampling(max_new_tokens=1))
            for t, x in [("deep", "a b c"), ("short", "one two three four five"), ("mid", "x")]]
    eager = Prefill(bank)(rows)
    padded = Prefill(bank, graphs=PrefillGraphs(bank, capture=False))(rows)
    assert padded.keys[0].shape == eager.keys[0].shape  # (3, H_kv, P + S, D_head)
    assert padded.prefix_length == eager.prefix_length == 6 and padded.prefixes() == eager.prefixes()
    torch.testing.assert_close(padded.scores, eager.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded.mask, eager.mask) and torch.equal(padded.positions, eager.positions)
    attended = eager.mask.bool()[:, None, :, None]
    for a, b in zip(padded.keys + padded.values, eager.keys + eager.values):
        torch.testing.assert_close(a * attended, b * attended, rtol=1e-4, atol=1e-4)


def test_a_sliding_window_family_is_not_padded(family_models):
    """Mistral's window is not in the 4-D mask the padded forward builds: by default its
    joins are not padded, and asking for it is refused."""
    bank, models, tok = bank_of(family_models, "mistral")
    assert Decoder(bank, graphs=False).prefill.graphs is None
    with pytest.raises(ConfigError, match="cannot be padded"):
        Decoder(bank, graphs=False, padded_prefill=True)


def test_padded_joins_run_the_compiled_prefill_where_the_decoder_compiles(family_models):
    """With compiling on, the padded forward (what a graph records) is the prefill's
    compiled one (dynamic shapes: every bucket shares its versions): rows == alone."""
    from softprompt.serve.prefill import prefill_forward
    from test_serve_slots import compiled_graphs

    torch._dynamo.reset()
    bank, models, tok = bank_of(family_models, "llama")
    decoder = Decoder(bank, max_rows=3, graphs=False, compile=True, padded_prefill=True)
    assert decoder.prefill.graphs.forward is decoder.prefill._forward
    for i, names in enumerate([["deep"], ["short", "mid", "deep"], ["mid", "short"]]):
        text = " ".join(["word"] * (3 + 7 * i))
        rows = [DecodeRow(t, {"text": text}, Sampling(max_new_tokens=3)) for t in names]
        decoder.run(rows)
        for row, task in zip(rows, names):
            assert row.tokens == alone(models[task], {"text": text}, 3, None)[:3], (task, text)
    assert decoder.prefill.compiled and compiled_graphs(prefill_forward) >= 1
