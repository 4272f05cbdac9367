"""Training views of the base (training/regions.py): checkpointed and compiled blocks give the same
loss and prompt gradients as the plain base, deep prompts included, and leave the base as it was."""

from __future__ import annotations

import pytest
import torch

import softprompt as sp
from softprompt import regions
from softprompt.errors import ConfigError

from conftest import CAUSAL, ENCODERS, SEQ2SEQ

METHODS = {
    "prompt_tuning": lambda: sp.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning_lstm": lambda: sp.PTuningConfig(template="[P:2] {text} [P:2] It was [MASK] .", encoder="lstm"),
    "prefix_tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=4, projection_hidden_size=24),
    "p_tuning_v2": lambda: sp.PTuningV2Config(num_virtual_tokens=4),
}
TEXTS = [{"text": "a gem of a film"}, {"text": "dull , flat and far too long for what it has to say"}]


def _loss_and_grads(model, family):
    model.train()
    model.prompt.zero_grad(set_to_none=True)
    batch = model.encode(TEXTS)
    if family in SEQ2SEQ:
        labels = torch.tensor([[5, 6, 7], [8, 9, -100]])
        out = model(**batch, labels=labels)
        loss = out.loss
    else:
        out = model(**batch)
        logits = out.logits if out.logits is not None else out.last_hidden_state
        loss = (logits.float() ** 2 * out.attention_mask[..., None]).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.prompt.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _without_dropout(base):
    """Dropout off (modules, and the float rates attention implementations read), so that
    the recomputation and the two runs see the same function."""
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_rate"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("option", ["checkpointing", "compile", "both"])
def test_view_gives_the_plain_loss_and_gradients(family_models, family, method, option):
    base, tok = family_models(family)
    _without_dropout(base)
    config = METHODS[method]()
    if method == "p_tuning_lstm" and family not in ENCODERS + CAUSAL:
        config = sp.PTuningConfig(template="[P:2] {text} [P:2]", encoder="lstm")
    model = sp.SoftPromptModel(base, config, tokenizer=tok)
    if family in SEQ2SEQ and model.deep and option != "compile":
        with pytest.raises(ConfigError, match="not supported for encoder-decoders"):
            with model.accelerated(checkpointing=True):
                pass
        return
    layer_types = [type(m) for m in base.modules()]
    loss, grads = _loss_and_grads(model, family)
    options = dict(compile=option in ("compile", "both"), checkpointing=option in ("checkpointing", "both"),
                   compile_options={"backend": "aot_eager"})
    with model.accelerated(**options):
        view_loss, view_grads = _loss_and_grads(model, family)
        assert model._running_base() is not model.base
        model.eval()
        assert model._running_base() is model.base  # evaluation runs the base as it is
    torch.testing.assert_close(view_loss, loss, rtol=1e-5, atol=1e-6)
    assert view_grads.keys() == grads.keys() and grads
    for name in grads:
        scale = float(grads[name].abs().max())  # float error of a reordered computation, relative to the gradient
        torch.testing.assert_close(view_grads[name], grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert [type(m) for m in base.modules()] == layer_types  # the base was not modified
    assert model._train_base is None


def test_checkpointing_recomputes_blocks_on_the_deep_prefix(family_models):
    """The recomputation really happens (the block runs twice per training forward) and
    sees the prefix: P-tuning v2's gradient is the one without checkpointing."""
    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3), tokenizer=tok)
    calls = []
    handle = base.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with model.accelerated(checkpointing=True):
            _loss_and_grads(model, "llama")
    finally:
        handle.remove()
    assert len(calls) == 2


def test_view_shares_parameters_and_refuses_models_without_blocks(family_models):
    base, _ = family_models("gpt2")
    v = regions.view(base, checkpointing=True)
    assert v is not base and regions.repeated_blocks(base) == 2
    assert {id(p) for p in v.parameters()} == {id(p) for p in base.parameters()}
    assert regions.view(base) is base
    with pytest.raises(ConfigError, match="no list of repeated blocks"):
        regions.view(torch.nn.Linear(2, 2), checkpointing=True)


def test_checkpointing_deep_prompt_on_a_sliding_window_family_is_refused(family_models):
    base, tok = family_models("mistral")
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3), tokenizer=tok)
    with pytest.raises(ConfigError, match="sliding-window"):
        with model.accelerated(checkpointing=True):
            pass
