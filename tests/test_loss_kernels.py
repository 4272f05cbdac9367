"""Which kernel computes a causal LM's token loss in training (``train.lm_loss``,
`fast_path.resolved_lm_loss`): softprompt's chunks anywhere, liger-kernel's fused linear
cross-entropy on a CUDA device. On the CPU: what ``auto`` picks and why, the refusals, and
that the kernel reaches the loss in training forwards only. On a GPU (skipped elsewhere,
with its reason): liger's loss and every trainable parameter's gradient equal the chunks'."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

import softprompt as sp
from softprompt import loss
from softprompt.errors import ConfigError
from softprompt.training.config import TrainConfig
from softprompt.training.fast_path import resolved_lm_loss

from test_chunked_loss import METHODS

CUDA = torch.device("cuda")


def _frozen(family_models, **scaling):
    """A tiny Llama frozen as `SoftPromptModel` freezes its base, its config given `scaling`."""
    base = family_models("llama")[0].requires_grad_(False)
    for name, value in scaling.items():
        setattr(base.config, name, value)
    return base


def _liger_chunks(positions: int, vocab: int, hidden: int, budget: int) -> tuple[int, int]:
    """(positions a chunk holds, chunks) of liger-kernel's fused loss for ``chunk_mem_const`` `budget`."""
    size = loss.liger_chunk(positions, vocab, hidden, budget)
    return size, -(-positions // size)


@pytest.mark.parametrize("positions, vocab, hidden, default, ours", [
    (3000, 128256, 2048, (64, 47), (1024, 3)),  # the packed instruct mix of a 1B Llama: 47 chunks in the H100 profile
    (8192, 128256, 2048, (256, 32), (1024, 8)),  # 1B, 16 x 512
    (8192, 128256, 4096, (256, 32), (1024, 8)),  # 8B, 16 x 512
    (8192, 49152, 576, (128, 64), (2048, 4)),  # SmolLM2-135M
    (40, 128256, 2048, (1, 40), (40, 1)),  # answer slots only: liger reads the head twice per position
])
def test_liger_chunks_hold_about_the_chunks_budget_for_a_frozen_head(positions, vocab, hidden, default, ours):
    """liger sizes its chunks for a head that trains (the states' own size); a frozen head is
    read twice per chunk, so softprompt asks for chunks of about `LOSS_CHUNK_SCORES` scores:
    fewer reads of the head, never more than twice the budget a chunk."""
    assert _liger_chunks(positions, vocab, hidden, 1) == default  # liger's own sizing
    budget = loss.liger_chunk_budget(positions, vocab, hidden)
    size, chunks = _liger_chunks(positions, vocab, hidden, budget)
    assert (size, chunks) == ours
    assert size * vocab <= 2 * loss.LOSS_CHUNK_SCORES
    assert loss.liger_chunk(positions, vocab, hidden, budget + 1) * vocab > 2 * loss.LOSS_CHUNK_SCORES or chunks == 1


def test_auto_keeps_the_chunks_on_the_cpu_and_says_nothing(family_models, caplog):
    base = _frozen(family_models)
    with caplog.at_level(logging.INFO, logger="softprompt"):
        assert resolved_lm_loss("auto", base, torch.device("cpu")) == "chunks"
    assert "lm_loss" not in caplog.text
    assert resolved_lm_loss("chunks", base, torch.device("cpu")) == "chunks"


def test_liger_asked_for_where_it_cannot_run_is_refused_with_the_reason(family_models):
    base = _frozen(family_models)
    with pytest.raises(ConfigError, match="train.lm_loss=liger: liger-kernel runs on CUDA devices, not on the CPU"):
        resolved_lm_loss("liger", base, torch.device("cpu"))
    granite = _frozen(family_models, logits_scaling=4.0)
    with pytest.raises(ConfigError, match="LM head scales its scores"):
        resolved_lm_loss("liger", granite, CUDA)
    trained_head = _frozen(family_models)
    trained_head.get_output_embeddings().weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="LM head is trained or sharded"):
        resolved_lm_loss("liger", trained_head, CUDA)


def test_auto_on_a_gpu_picks_liger_where_installed_else_says_why_not(family_models, monkeypatch, caplog):
    """The decision on a CUDA device, with liger-kernel's presence faked either way (the
    decision reads only whether it is importable)."""
    base = _frozen(family_models)
    real_find_spec = importlib.util.find_spec
    installed = {"liger_kernel": False}

    def find_spec(name, *args):
        if name in installed:
            return object() if installed[name] else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with caplog.at_level(logging.INFO, logger="softprompt"):
        assert resolved_lm_loss("auto", base, CUDA) == "chunks"
    assert "liger-kernel is not installed (pip install 'softprompt[liger]')" in caplog.text
    installed["liger_kernel"] = True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="softprompt"):
        assert resolved_lm_loss("auto", base, CUDA) == "liger"
    assert "fused LM head and cross-entropy" in caplog.text
    # a head that scales its scores stays on the chunks, with the reason
    with caplog.at_level(logging.INFO, logger="softprompt"):
        assert resolved_lm_loss("auto", _frozen(family_models, logit_scale=0.5), CUDA) == "chunks"
    assert "scales its scores" in caplog.text
    assert resolved_lm_loss("auto", base, CUDA, causal=False) == "chunks"  # encoders: no LM loss from states


def test_a_bad_setting_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"train.lm_loss must be auto, chunks or liger, got 'fused'"):
        TrainConfig(lm_loss="fused").validate()


def test_the_kernel_reaches_the_loss_in_training_forwards_only(family_models, monkeypatch):
    """`SoftPromptModel.accelerated(lm_loss=...)` hands its kernel to `summed_token_loss` for
    training forwards (train mode, grad on); evaluation forwards keep the chunks."""
    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, METHODS["prompt-tuning"](), tokenizer=tok)
    batch = model.encode([{"text": "a b c d"}, {"text": "e f"}])
    labels = batch["input_ids"][batch["prompt_index"] < 0].view(2, -1).clone()
    labels[batch.align_to_real_tokens(batch["attention_mask"]) == 0] = -100
    seen, summed = [], loss.summed_token_loss

    def recorded(base, states, wanted, kernel="chunks"):
        seen.append(kernel)
        return summed(base, states, wanted)  # the chunks compute it: the CPU has no liger

    monkeypatch.setattr(loss, "summed_token_loss", recorded)
    with model.accelerated(lm_loss="liger"):
        model.train()
        trained = model(**batch, labels=labels, logits="none").loss
        model.eval()
        with torch.no_grad():
            evaluated = model(**batch, labels=labels, logits="none").loss
    model.train()
    outside = model(**batch, labels=labels, logits="none").loss
    assert seen == ["liger", "chunks", "chunks"]
    torch.testing.assert_close(trained.detach(), evaluated)
    torch.testing.assert_close(outside.detach(), evaluated)


def _liger_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (liger-kernel's Triton kernels)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "needs liger-kernel (pip install 'softprompt[liger]')"
    return None


def _loss_and_grads(model, batch, labels, lm_loss):
    model.zero_grad(set_to_none=True)
    with model.accelerated(lm_loss=lm_loss):
        model.train()
        value = model(**batch, labels=labels, logits="none").loss
        value.backward()
    return value.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(_liger_ready() is not None, reason=str(_liger_ready()))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16"])
def test_liger_s_loss_and_gradients_equal_the_chunks_on_a_gpu(method, precision, family_models, monkeypatch):
    """Every method on a tiny Llama on the GPU, left-padded rows with unscored inputs, the
    base in fp32, in fp32 under bf16 autocast (``train.mixed_precision=auto`` on a GPU) and
    in bf16: the fused kernel's loss and gradients against the chunks' (several chunks)."""
    base, tok = family_models("llama")
    base = base.to(CUDA, torch.bfloat16 if precision == "bf16" else torch.float32)
    model = sp.SoftPromptModel(base, METHODS[method](), tokenizer=tok).to(CUDA)
    batch = model.encode([{"text": "a short one"}, {"text": "the second row is the longest of the three"},
                          {"text": "and a third"}])
    real = batch["input_ids"][batch["prompt_index"] < 0].view(3, -1)
    labels = real.clone()
    labels[:, :2] = -100
    labels[batch.align_to_real_tokens(batch["attention_mask"]) == 0] = -100
    monkeypatch.setattr(loss, "LOSS_CHUNK_SCORES", 5 * base.get_output_embeddings().weight.shape[0])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    with autocast:
        chunks, chunk_grads = _loss_and_grads(model, batch, labels, "chunks")
    with autocast:
        fused, fused_grads = _loss_and_grads(model, batch, labels, "liger")
    tolerance = 1e-5 if precision == "fp32" else 2e-2  # bf16: one rounding step of the scores
    torch.testing.assert_close(fused, chunks, rtol=tolerance, atol=tolerance)
    assert chunk_grads and chunk_grads.keys() == fused_grads.keys()
    for name in chunk_grads:
        scale = chunk_grads[name].abs().max().item()
        difference = (fused_grads[name] - chunk_grads[name]).abs().max().item()
        assert difference <= (1e-4 if precision == "fp32" else 5e-2) * scale + 1e-9, (name, difference, scale)
    assert any(g.abs().sum() > 0 for g in chunk_grads.values())


def test_a_run_asked_for_liger_on_the_cpu_stops_before_it_writes_anything(family_models, tmp_path):
    """`train` resolves ``train.lm_loss`` before its loop exists: a kernel that cannot run
    here is refused by name and the output folder is never made."""
    from softprompt.tasks import SequenceClassification
    from softprompt.training.loop import train

    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, METHODS["prompt-tuning"](), tokenizer=tok)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.lm_loss=liger: liger-kernel runs on CUDA devices, not on the CPU"):
        train(model, SequenceClassification(["neg", "pos"]), [{"text": "a b", "label": "pos"}], None,
              TrainConfig(steps=2, batch_size=1, lm_loss="liger", progress=False), out)
    assert not out.exists()
