"""A causal LM's token loss without its (B, S, V) logits (`loss.chunked_token_loss`, what
a generation task trains with): the LM head runs only at the target columns, a chunk at a
time, each chunk's gradient taken at once. Same loss and the same gradients for every
trainable parameter as the loss over the whole logits, for every method on every causal
family, with several chunks and left padding."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt import loss
from softprompt.errors import ConfigError

from conftest import CAUSAL

METHODS = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(template="[P:3] {text} [P:2]", init="random"),
    "p-tuning": lambda: sp.PTuningConfig(template="[P:2] {text} [P:2]", encoder="lstm", encoder_hidden_size=16),
    "prefix-tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=4, template="{text}", encoder_hidden_size=16),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=4, template="{text}"),
}


def _loss_and_grads(model, batch, labels, logits):
    model.zero_grad(set_to_none=True)
    value = model(**batch, labels=labels, logits=logits).loss
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", CAUSAL)
def test_the_chunked_loss_equals_the_loss_over_the_whole_logits(family, method, family_models, monkeypatch):
    base, tok = family_models(family)
    model = sp.SoftPromptModel(base, METHODS[method](), tokenizer=tok)
    batch = model.encode([{"text": "a short one"}, {"text": "the second row is the longest of the three"},
                          {"text": "and a third"}])
    real = batch["input_ids"][batch["prompt_index"] < 0].view(3, -1)  # (B, T) the real tokens
    labels = real.clone()
    labels[:, :2] = -100  # the first tokens unscored, as a generation task's input
    labels[batch.align_to_real_tokens(batch["attention_mask"]) == 0] = -100
    whole, grads = _loss_and_grads(model, batch, labels, "all")
    monkeypatch.setattr(loss, "LOSS_CHUNK_SCORES", 5 * base.get_output_embeddings().weight.shape[0])  # 5 positions a chunk
    chunked, chunked_grads = _loss_and_grads(model, batch, labels, "none")
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert grads and grads.keys() == chunked_grads.keys()
    for name in grads:
        difference = (chunked_grads[name] - grads[name]).abs().max().item()
        assert difference <= 1e-4 * grads[name].abs().max().item() + 1e-9, (name, difference, grads[name].abs().max())
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_a_masked_lm_is_told_to_use_the_whole_logits(family_models):
    base, tok = family_models("bert")
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}", init="random"), tokenizer=tok)
    batch = model.encode([{"text": "a b"}])
    with pytest.raises(ConfigError, match="not a causal LM: use logits='all'"):
        model(**batch, labels=torch.full((1, 4), -100), logits="none")


def test_a_head_that_trains_is_scored_whole(family_models):
    """A head with a gradient of its own (not softprompt's frozen base) cannot be scored
    outside the forward: the loss falls back to the whole logits, still right, and the
    head gets its gradient."""
    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, METHODS["prompt-tuning"](), tokenizer=tok)
    assert loss.chunkable(base)
    head = base.get_output_embeddings().weight
    head.requires_grad_(True)
    assert not loss.chunkable(base)
    batch = model.encode([{"text": "a b c d"}])
    labels = batch["input_ids"][batch["prompt_index"] < 0].view(1, -1)
    whole, _ = _loss_and_grads(model, batch, labels, "all")
    fallback, _ = _loss_and_grads(model, batch, labels, "none")
    torch.testing.assert_close(fallback, whole)
    assert head.grad is not None and head.grad.abs().sum() > 0
