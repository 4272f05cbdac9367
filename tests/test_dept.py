"""DePT (a short prompt plus a low-rank update of the input embeddings): where the update
goes, its collapsed form, its saved folder, its two learning rates, its config errors.
The contract suite (test_contract.py) and the mixed-batch suite (test_serve_mixed.py) run
it beside the other methods."""

from __future__ import annotations

import json
import math

import pytest
import torch

import softprompt as sp
from softprompt import inject
from softprompt.methods.collapsed import CollapsedPrompt
from softprompt.methods.dept import DePT

TEXTS = [{"text": "a gem of a film"}, {"text": "bad"}, {"text": "the plot wanders but the cast holds it together"}]


def trained(model: sp.SoftPromptModel, seed: int = 0) -> sp.SoftPromptModel:
    """B set off zero, as after training (it starts at 0), so that the delta acts."""
    with torch.no_grad():
        model.prompt.low_rank.B.copy_(torch.randn(model.prompt.low_rank.B.shape,
                                                  generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model


def dept(family_models, family="llama", **fields):
    base, tok = family_models(family)
    config = sp.DePTConfig(**{"template": "[P:2] {text} It was [MASK] .", "rank": 3, "max_input_length": 6, **fields})
    return trained(sp.SoftPromptModel(base, config, tokenizer=tok).eval()), base, tok


def test_add_input_delta_counts_the_rows_real_tokens():
    """Row j of the delta goes to the j-th attended non-virtual token of a row, wherever the
    pads and the virtual slots are; tokens past S_max get none."""
    E = torch.zeros(2, 7, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    slots = torch.tensor([[-1, -1, -1, 0, 1, -1, -1], [0, -1, 1, -1, -1, -1, -1]])
    delta = torch.tensor([[10.0], [20.0], [30.0]])  # S_max = 3
    out = inject.add_input_delta(E, mask, slots, delta)[..., 0]
    assert out.tolist() == [[0, 0, 10, 0, 0, 20, 30], [0, 10, 0, 20, 30, 0, 0]]
    per_row = torch.stack([delta, 2 * delta])  # (B, S_max, D)
    out = inject.add_input_delta(E, mask, slots, per_row)[..., 0]
    assert out.tolist() == [[0, 0, 10, 0, 0, 20, 30], [0, 20, 0, 40, 60, 0, 0]]


def test_init_follows_the_papers_code(family_models):
    """B zero (the delta starts at 0), A Kaiming-uniform (bound 1/sqrt(r)), scale alpha/sqrt(r)."""
    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, sp.DePTConfig(num_virtual_tokens=4, rank=16, max_input_length=300), tokenizer=tok)
    low = model.prompt.low_rank
    assert low.A.shape == (300, 16) and low.B.shape == (16, model.spec.hidden_size)
    assert torch.count_nonzero(low.B) == 0 and torch.count_nonzero(model.export_input_delta()) == 0
    bound = 1 / math.sqrt(16)
    top = float(low.A.detach().abs().max())
    assert 0.9 * bound < top <= bound
    assert low.scale == pytest.approx(8 / 4)
    again = sp.SoftPromptModel(base, sp.DePTConfig(num_virtual_tokens=4, rank=16, max_input_length=300), tokenizer=tok)
    assert torch.equal(again.prompt.low_rank.A, low.A)  # seeded by init_seed


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_delta_equals_the_base_on_shifted_embeddings(family_models, family):
    """The forward equals the base model run on embeddings built by hand: the table at the
    slots, the delta's row j added to the j-th real token (at most S_max of them)."""
    model, base, _ = dept(family_models, family)
    side = "left" if model.spec.accepts_position_ids else "right"
    batch = model.encode(TEXTS, padding_side=side)
    with torch.no_grad():
        ours = model(**batch, **_decoder(model, base, len(TEXTS)))
        embeds = base.get_input_embeddings()(batch["input_ids"]).clone()
        table, delta = model.export(), model.export_input_delta()
        for b in range(len(TEXTS)):
            j = 0
            for s in range(batch["input_ids"].shape[1]):
                slot = int(batch["prompt_index"][b, s])
                if slot >= 0:
                    embeds[b, s] = table[slot]
                elif batch["attention_mask"][b, s]:
                    if j < delta.shape[0]:
                        embeds[b, s] += delta[j]
                    j += 1
        kwargs = dict(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **_decoder(model, base, len(TEXTS)))
        if model.spec.accepts_position_ids:
            kwargs["position_ids"] = inject.position_ids(batch["attention_mask"], model.spec)
        reference = base(**kwargs)
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-5)
    else:
        keep = inject.real_token_index(batch["prompt_index"])
        torch.testing.assert_close(ours.logits, inject.gather_tokens(reference.logits, keep), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the delta does act
        plain = model(**batch, **_decoder(model, base, len(TEXTS)))
        model.prompt.low_rank.B.zero_()
        zero = model(**batch, **_decoder(model, base, len(TEXTS)))
    assert not torch.allclose(plain.logits, zero.logits, atol=1e-4)


def _decoder(model, base, n):
    if model.spec.kind is not sp.ModelKind.SEQ2SEQ:
        return {}
    return {"decoder_input_ids": torch.full((n, 2), base.config.decoder_start_token_id)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_collapsed_form_gives_the_training_forms_logits(family_models, family):
    model, base, tok = dept(family_models, family)
    collapsed = sp.SoftPromptModel(base, model.config, tokenizer=tok, prompt=CollapsedPrompt.of(model.prompt)).eval()
    assert collapsed.prompt.delta.shape == (6, model.spec.hidden_size)
    batch = model.encode(TEXTS)
    with torch.no_grad():
        a, b = model(**batch), collapsed(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.answer_logits, b.answer_logits)


def test_gradients_reach_the_prompt_and_both_factors_not_the_base(family_models):
    model, base, _ = dept(family_models)
    model.train()
    out = model(**model.encode(TEXTS))
    out.logits.float().pow(2).mean().backward()
    prompt = model.prompt
    for name, p in (("P", prompt.embedding), ("A", prompt.low_rank.A), ("B", prompt.low_rank.B)):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    # A's rows past the longest row's real tokens get no gradient: the delta covers real tokens only
    assert torch.count_nonzero(prompt.low_rank.A.grad.abs().sum(1)) <= 6


def test_at_initialisation_only_B_and_the_prompt_learn(family_models):
    """B = 0: A's gradient is 0 (LoRA's start), B's and P's are not."""
    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, sp.DePTConfig(template="[P:2] {text}", rank=2, max_input_length=8), tokenizer=tok)
    model(**model.encode(TEXTS)).logits.float().pow(2).mean().backward()
    assert float(model.prompt.low_rank.A.grad.abs().sum()) == 0
    assert float(model.prompt.low_rank.B.grad.abs().sum()) > 0 and float(model.prompt.embedding.grad.abs().sum()) > 0


def test_two_learning_rates_in_the_optimizer(family_models):
    """The prompt trains at train.lr, the low-rank pair at train.delta_lr: AdamW's first step
    moves each parameter by at most its group's rate (by about it where the gradient is clear)."""
    from softprompt.tasks import SequenceClassification
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import make_optimizer

    model, base, _ = dept(family_models)
    task = SequenceClassification(["neg", "pos"])
    task.bind(model)
    config = TrainConfig(lr=0.1, delta_lr=1e-3, head_lr=5e-3)
    optimizer = make_optimizer(model, task, config)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {"prompt": 0.1, "input_delta": 1e-3, "head": 5e-3}
    assert [id(p) for p in groups["input_delta"]["params"]] == [id(model.prompt.low_rank.A), id(model.prompt.low_rank.B)]
    assert [id(p) for p in groups["prompt"]["params"]] == [id(model.prompt.embedding)]
    before = {n: p.detach().clone() for n, p in model.prompt.named_parameters()}
    model.train()
    batch, targets = task.collate(model, [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    task.loss(model, batch, targets).backward()
    optimizer.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.prompt.named_parameters()}
    assert 0.05 < moved["embedding"] <= 0.1 + 1e-6
    assert 5e-4 < moved["low_rank.B"] <= 1e-3 + 1e-7 and moved["low_rank.A"] <= 1e-3 + 1e-7


def test_other_methods_keep_one_prompt_group(family_models):
    from softprompt.tasks import SequenceClassification
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import make_optimizer

    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}"), tokenizer=tok)
    task = SequenceClassification(["neg", "pos"])
    task.bind(model)
    assert [g["name"] for g in make_optimizer(model, task, TrainConfig()).param_groups] == ["prompt", "head"]


@pytest.mark.parametrize("fields,match", [
    (dict(rank=0), r"DePTConfig.rank must be a positive integer, got 0"),
    (dict(rank=2.5), r"DePTConfig.rank must be a positive integer"),
    (dict(max_input_length=0), r"DePTConfig.max_input_length must be a positive integer, got 0"),
    (dict(alpha=0), r"DePTConfig.alpha must be a positive number, got 0"),
    (dict(alpha=float("nan")), r"DePTConfig.alpha must be a positive number"),
    (dict(init="zeros"), r"DePTConfig.init must be one of"),
    (dict(init="text"), r"DePTConfig.init='text' needs init_text"),
])
def test_config_errors_name_the_field(family_models, fields, match):
    base, tok = family_models("llama")
    with pytest.raises(sp.ConfigError, match=match):
        sp.SoftPromptModel(base, sp.DePTConfig(num_virtual_tokens=2, **fields), tokenizer=tok)


def test_train_delta_lr_must_be_positive():
    from softprompt.training.config import TrainConfig

    with pytest.raises(sp.ConfigError, match=r"train.delta_lr must be positive, got 0"):
        TrainConfig(delta_lr=0).validate()


def test_save_load_round_trip_and_folder_fields(family_models, tmp_path):
    model, base, tok = dept(family_models)
    model.save_pretrained(tmp_path / "p")
    data = json.loads((tmp_path / "p" / "prompt_config.json").read_text())
    assert data["method"] == "dept" and data["kind"] == "input"
    assert data["tensor_shape"] == [2, 32] and data["input_delta_shape"] == [6, 32]
    assert data["config"]["rank"] == 3 and data["config"]["max_input_length"] == 6
    batch = model.encode(TEXTS)
    with torch.no_grad():
        expected = model(**batch)
    for trainable in (False, True):
        loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / "p", tokenizer=tok, trainable=trainable).eval()
        assert isinstance(loaded.prompt, DePT if trainable else CollapsedPrompt)
        assert torch.equal(loaded.export_input_delta(), model.export_input_delta())
        with torch.no_grad():
            got = loaded(**batch)
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.answer_logits, expected.answer_logits)


def test_folders_without_the_new_fields_load_as_before(family_models, tmp_path):
    """A prompt-tuning folder carries no input_delta field and loads without a delta; a
    DePT folder that lost its delta is refused, naming the field."""
    base, tok = family_models("llama")
    pt = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}"), tokenizer=tok)
    pt.save_pretrained(tmp_path / "pt", save_trainable=False)
    data = json.loads((tmp_path / "pt" / "prompt_config.json").read_text())
    assert "input_delta_shape" not in data
    loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / "pt", tokenizer=tok)
    assert loaded.export_input_delta() is None and loaded.prompts().input_delta is None
    model, _, _ = dept(family_models)
    model.save_pretrained(tmp_path / "d", save_trainable=False)
    path = tmp_path / "d" / "prompt_config.json"
    data = json.loads(path.read_text())
    del data["input_delta_shape"]
    path.write_text(json.dumps(data))
    with pytest.raises(sp.PromptFileError, match="input_delta_shape"):
        sp.SoftPromptModel.from_pretrained(base, tmp_path / "d", tokenizer=tok)
    data["input_delta_shape"] = [6, 7]
    path.write_text(json.dumps(data))
    with pytest.raises(sp.PromptFileError, match=r"'input_delta_shape' is \[6, 7\]; expected \[S_max, 32\]"):
        sp.SoftPromptModel.from_pretrained(base, tmp_path / "d", tokenizer=tok)


def test_cli_info_shows_the_method_and_delta(family_models, tmp_path):
    from typer.testing import CliRunner

    from softprompt.cli import app

    model, _, _ = dept(family_models)
    model.save_pretrained(tmp_path / "d")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    rows = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in result.output.splitlines())}
    assert rows["method"] == "dept" and rows["kind"] == "input"
    assert rows["tensor shape"] == "[2, 32]" and rows["input delta shape"] == "[6, 32]"
    assert rows["parameters"] == "256"  # 2 x 32 table + 6 x 32 delta


def test_peft_export_refuses_dept(family_models, tmp_path):
    from softprompt.peft_format import export_peft

    base, tok = family_models("gpt2")
    model = sp.SoftPromptModel(base, sp.DePTConfig(template="[P:2] {text}", rank=2), tokenizer=tok)
    with pytest.raises(sp.ConfigError, match="PEFT has no DePT"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_causal_generation_task_is_refused(family_models):
    from softprompt.tasks import Generation

    base, tok = family_models("llama")
    model = sp.SoftPromptModel(base, sp.DePTConfig(template="[P:2] {text}", rank=2), tokenizer=tok)
    with pytest.raises(sp.ConfigError, match="appended target"):
        Generation().bind(model)


def test_generation_continues_the_row_with_its_delta(family_models):
    """The row given to generate gets the delta as in a forward (its first new token is the
    forward's last-column argmax); tokens it generates are not part of the row and get none
    (the contract suite's greedy test, whose rows are longer than S_max, checks the rest)."""
    model, base, _ = dept(family_models, "llama")
    batch = model.encode(TEXTS[:2], padding_side="left")
    new = model.generate(**batch, max_new_tokens=1, do_sample=False)
    with torch.no_grad():
        last = model(**batch).logits[:, -1].argmax(-1)
        model.prompt.low_rank.B.zero_()
        without = model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert new[:, 0].tolist() == last.tolist()
    assert torch.equal(without[:, 0], model(**batch).logits[:, -1].argmax(-1))
