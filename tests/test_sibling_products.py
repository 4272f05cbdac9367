"""Sibling projections (Q/K/V, gate/up) as one product in the compiled decode step
(`serve/sibling_products.py`): the weights are laid side by side without changing a value,
the compiler pass fuses exactly the products whose weights lie side by side, and the
compiled step's rows equal the rows run alone."""

import pytest
import torch
from conftest import make_llama, make_qwen2
from torch._dynamo.utils import counters

from softprompt.serve.sibling_products import SIBLINGS, frozen_with_siblings, pack_siblings, side_by_side


def _groups(base):
    for module in base.modules():
        for names in SIBLINGS:
            if all(hasattr(module, n) for n in names):
                yield [getattr(module, n) for n in names]


@pytest.mark.parametrize("make", [make_llama, make_qwen2])
def test_packing_keeps_every_value_and_lays_siblings_side_by_side(gpt2_tokenizer, make):
    base = make(gpt2_tokenizer)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = base(ids).logits
    layers = base.config.num_hidden_layers
    assert not any(side_by_side([m.weight for m in g]) for g in _groups(base))  # as loaded: separate
    assert pack_siblings(base) == 2 * layers
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for group in _groups(base):
        assert side_by_side([m.weight for m in group])
        if group[0].bias is not None:  # Qwen2's Q/K/V biases
            assert side_by_side([m.bias for m in group])
    assert torch.equal(base(ids).logits, logits)
    storages = {m.weight.untyped_storage().data_ptr() for g in _groups(base) for m in g}
    assert len(storages) == 2 * layers  # one buffer per group: nothing copied twice
    assert pack_siblings(base) == 2 * layers  # packed again: left as it is
    assert {m.weight.untyped_storage().data_ptr() for g in _groups(base) for m in g} == storages


@pytest.mark.parametrize("make", [make_llama, make_qwen2])
def test_compiled_forward_fuses_side_by_side_siblings_and_equals_eager(gpt2_tokenizer, make):
    """Frozen and compiled with the pass: one product per group (2 per layer: Q/K/V,
    gate/up; with biases too), the logits equal to the eager forward's; without packing
    the pass fuses nothing (it never copies a weight)."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for packed in (False, True):
        torch._dynamo.reset()
        counters.clear()
        base = make(gpt2_tokenizer)
        layers = base.config.num_hidden_layers
        with torch.no_grad():
            eager = base(ids).logits
            if packed:
                pack_siblings(base)
            compiled = torch.compile(lambda x: base(x).logits)
            with frozen_with_siblings():
                out = compiled(ids)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        assert counters["inductor"]["sibling_products"] == (2 * layers if packed else 0)


@pytest.mark.parametrize("compile, siblings, packed", [(True, True, True), (True, False, False), (False, True, False)])
def test_the_decoder_packs_before_its_first_prefill(gpt2_tokenizer, compile, siblings, packed):
    """Packing moves the weights: a CUDA graph captured before (the decoder's prefill graphs,
    captured at its first join) would read their old, freed storage, an illegal memory access
    on an H100. So a decoder that fuses siblings packs them when it is made, before any
    prefill, and one that does not leaves the weights where they are."""
    from softprompt.serve import PromptBank
    from softprompt.serve.decode import Decoder

    base = make_llama(gpt2_tokenizer)
    Decoder(PromptBank(base, gpt2_tokenizer), compile=compile, sibling_products=siblings)
    assert all(side_by_side([m.weight for m in g]) for g in _groups(base)) is packed
