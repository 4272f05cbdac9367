"""The frozen base's linear layers in FP8 for training (`float8.py`, ``train.float8``): the
products equal the rowwise-scaled E4M3 arithmetic they stand for, stay close to the
layer's own, give the input's gradient only, leave the base untouched, and a run trains
close to the bf16/fp32 run; a base with nothing to convert is refused by name."""

import logging

import pytest
import torch
from conftest import make_gpt2, make_llama
from torch import nn

import softprompt as sp
from softprompt import regions
from softprompt.float8 import Float8Frozen, rowwise
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
from test_train import DATA, _weights, setup, small


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T with both quantized as the layer quantizes them, in float32."""
    xv, xs = rowwise(x)
    wv, ws = rowwise(w)
    return (xv.float() * xs) @ (wv.float() * ws).t()


def test_products_are_the_rowwise_e4m3_arithmetic_and_close_to_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).requires_grad_(False)
    weight = linear.weight.clone()
    fp8 = Float8Frozen(linear)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = fp8(x)
    assert out.shape == (3, 5, 48)
    torch.testing.assert_close(out, (_reference(x.detach().reshape(-1, 64), weight) + linear.bias).view(3, 5, 48),
                               rtol=1e-5, atol=1e-5)
    exact = linear(x)
    assert 0 < (out - exact).norm() / exact.norm() < 0.08  # E4M3: ~3 mantissa bits per factor
    grad = torch.randn_like(out)
    out.backward(grad)
    # the input's gradient: g W with g rowwise-quantized and W quantized per input column
    gv, gs = rowwise(grad.reshape(-1, 48))
    wtv, wts = rowwise(weight.t().contiguous())
    torch.testing.assert_close(x.grad.reshape(-1, 64), (gv.float() * gs) @ (wtv.float() * wts).t(), rtol=1e-5, atol=1e-5)
    assert linear.weight.grad is None and torch.equal(linear.weight, weight)  # frozen, untouched


def test_rowwise_keeps_zero_rows_and_the_largest_value():
    x = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    values, scales = rowwise(x)
    assert scales[0].item() == 1.0 and torch.equal(values[0].float(), torch.zeros(2))
    assert (values[1].float() * scales[1]).tolist() == pytest.approx([1.0, -3.0], rel=0.07)


def test_the_view_converts_the_blocks_linears_and_leaves_the_base_as_it_is(gpt2_tokenizer):
    base = make_llama(gpt2_tokenizer).requires_grad_(False)
    before = {n: type(m) for n, m in base.named_modules()}
    view = regions.view(base, float8=True)
    assert {n: type(m) for n, m in base.named_modules()} == before  # the base is not modified
    converted = [n for n, m in view.named_modules() if isinstance(m, Float8Frozen)]
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(converted) == per_layer * base.config.num_hidden_layers
    assert type(view.lm_head) is nn.Linear and view.lm_head is base.lm_head  # the head stays as it is
    assert view.model.embed_tokens is base.model.embed_tokens
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ours, exact = view(ids).logits, base(ids).logits
    assert 0 < (ours - exact).norm() / exact.norm() < 0.1


def test_the_view_says_how_many_linears_it_converts(gpt2_tokenizer, caplog):
    base = make_llama(gpt2_tokenizer).requires_grad_(False)
    layers = base.config.num_hidden_layers
    with caplog.at_level(logging.INFO, logger="softprompt.train"):
        regions.view(base, float8=True)
    assert f"{7 * layers} of {7 * layers} linear layers in LlamaForCausalLM's {layers} blocks run in FP8" in caplog.text
    assert "stay as they are" not in caplog.text
    caplog.clear()
    base.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # a trainable weight stays in its dtype
    with caplog.at_level(logging.INFO, logger="softprompt.train"):
        view = regions.view(base, float8=True)
    assert f"{7 * layers - 1} of {7 * layers} linear layers" in caplog.text and "; 1 stay as they are" in caplog.text
    assert type(view.model.layers[0].self_attn.q_proj) is nn.Linear


def test_the_prompts_gradient_in_float8_is_close_to_the_plain_one(wordpiece_tokenizer):
    """One training forward and backward through the FP8 view against the plain base: the
    deep prompt's gradient points the same way (a frozen base's products in E4M3)."""
    grads = []
    for float8 in (False, True):
        model, _ = setup(wordpiece_tokenizer)
        batch = model.encode([{"text": "a fine and moving film"}, {"text": "dull, flat and far too long"}])
        model.train()
        with model.accelerated(float8=float8):
            torch.manual_seed(0)  # the same dropout masks
            hidden = model(**batch, output_hidden_states=True).last_hidden_state.float()
            direction = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
            (hidden * direction).sum().backward()  # a loss whose gradient is not ~0 after the final norm
        grads.append(torch.cat([p.grad.flatten() for p in model.prompt.parameters() if p.grad is not None]))
    plain, fp8 = grads
    assert not torch.equal(plain, fp8)  # the FP8 products ran
    assert torch.nn.functional.cosine_similarity(plain, fp8, dim=0) > 0.99
    assert (fp8 - plain).norm() / plain.norm() < 0.15


def test_a_run_in_float8_trains_and_leaves_no_view(wordpiece_tokenizer, tmp_path):
    model, task = setup(wordpiece_tokenizer)
    start = _weights(model, task)
    train(model, task, DATA, None, small(steps=6, float8=True), tmp_path / "run")
    end = _weights(model, task)
    assert all(torch.isfinite(v).all() for v in end.values())
    assert any(not torch.equal(end[k], start[k]) for k in start if k.startswith("p."))  # the prompt trained
    assert model._train_base is None and not any(isinstance(m, Float8Frozen) for m in model.base.modules())


def test_float8_with_nothing_to_convert_is_refused_before_anything_is_written(gpt2_tokenizer, tmp_path):
    """GPT-2's blocks hold Conv1D layers, not nn.Linear: train.float8 would change nothing."""
    base = make_gpt2(gpt2_tokenizer)
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=4), tokenizer=gpt2_tokenizer)
    from softprompt.tasks import Verbalizer

    task = Verbalizer({"pos": " good", "neg": " bad"})
    with pytest.raises(sp.ConfigError, match="train.float8: GPT2LMHeadModel's blocks have no frozen nn.Linear"):
        train(model, task, DATA, None, small(steps=2, float8=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_float8_setting():
    with pytest.raises(sp.ConfigError, match="train.float8 must be true or false"):
        TrainConfig(float8="yes").validate()
