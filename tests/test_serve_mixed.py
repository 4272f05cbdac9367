"""Mixed-task batches: row b of a batch that mixes tasks (every method, different templates
and prompt lengths) equals row b run alone with its own task, forward and generate, with
left and right padding; the prompt bank loads, replaces, removes and evicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import softprompt as sp
from softprompt.serve import PromptBank, UnknownTaskError, encode_mixed, forward_mixed, generate_mixed

from conftest import CAUSAL, ENCODERS, SEQ2SEQ

# Five tasks on one base: every method, different templates, prompt lengths and answer slots.
TASKS = {
    "pt": lambda: sp.PromptTuningConfig(template="[P:2] {text} [P:2] It was [MASK] .", init="vocab"),
    "lstm": lambda: sp.PTuningConfig(template="{text} [P:3] It was [MASK] .", encoder="lstm", encoder_hidden_size=16),
    "mlp": lambda: sp.PTuningConfig(template="Review: [P:1] {text} [MASK]", encoder="mlp", encoder_hidden_size=16),
    "prefix": lambda: sp.PrefixTuningConfig(num_virtual_tokens=3, template="{text} It was [MASK] .",
                                            projection_hidden_size=16),
    "v2": lambda: sp.PTuningV2Config(num_virtual_tokens=5, template="Q: {text} A: [MASK]", init_std=0.5),
    # S_max 5: long rows have real tokens past the delta, short ones do not reach its end
    "dept": lambda: sp.DePTConfig(template="Say: [P:2] {text} It was [MASK]", rank=2, max_input_length=5),
}
TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "fine", "not my cup of tea"]


def make_bank(family_models, family, tasks=TASKS, **kwargs):
    base, tok = family_models(family)
    kwargs.setdefault("cache_prompts", False)  # rows run whole: outputs for every real token
    bank = PromptBank(base, tok, **kwargs)
    models = {}
    for name, make in tasks.items():
        torch.manual_seed(len(name))
        model = sp.SoftPromptModel(base, make(), tokenizer=tok).eval()
        if model.export_input_delta() is not None:  # DePT's B starts at 0: set it as training would
            with torch.no_grad():
                model.prompt.low_rank.B.normal_(0, 0.1)
        models[name] = model
        bank.add(name, model)
    return bank, models


def mixed_rows():
    """Every task twice, interleaved, with different texts."""
    names = list(TASKS) + list(reversed(TASKS))
    return names, [{"text": TEXTS[i % len(TEXTS)]} for i in range(len(names))]


def test_bart_refuses_deep_prompts_of_different_lengths_in_one_batch(family_models):
    bank, _ = make_bank(family_models, "bart")
    assert bank.prompt_length("prefix") == 3 and bank.prompt_length("v2") == 5 and bank.prompt_length("pt") == 0
    with pytest.raises(sp.ConfigError, match=r"different lengths \(\[0, 3\]\).*group them by prompt length"):
        bank.prompts_for(["pt", "prefix"])
    bank.prompts_for(["prefix", "prefix"])  # one length: fine


def real(out, b):
    """Row b's outputs at its real tokens."""
    keep = out.attention_mask[b].bool()
    return {k: getattr(out, k)[b][keep] for k in ("logits", "last_hidden_state") if getattr(out, k) is not None}


def decoder_ids(base, batch_size, length=3):
    start = base.config.decoder_start_token_id
    return torch.tensor([[start] + [5 + i for i in range(length - 1)]]).expand(batch_size, -1)


def same_length_deep(names, family, bank):
    """BART takes decoder positions from the cache length: its rows share a batch only at
    one prefix length (input prompts: 0), so its mixed batches keep the input tasks."""
    if family != "bart":
        return names
    return [n for n in names if bank.prompt_length(n) == 0]


# T5 and BART take no position ids: softprompt pads them on the right only.
SIDES = [(f, s) for f in CAUSAL + ENCODERS for s in ("left", "right")] + [(f, "right") for f in SEQ2SEQ]


@pytest.mark.parametrize("family,side", SIDES)
def test_mixed_forward_rows_equal_rows_alone(family_models, family, side):
    bank, models = make_bank(family_models, family)
    names, examples = mixed_rows()
    names = same_length_deep(names, family, bank)
    examples = examples[: len(names)]
    batch = encode_mixed(bank, names, examples, padding_side=side)
    extra = {"decoder_input_ids": decoder_ids(bank.base, len(names))} if family in SEQ2SEQ else {}
    out = forward_mixed(bank, batch, output_hidden_states=True, **extra)
    for b, (name, example) in enumerate(zip(names, examples)):
        model = models[name]
        alone_extra = {"decoder_input_ids": decoder_ids(bank.base, 1)} if family in SEQ2SEQ else {}
        with torch.no_grad():
            alone = model(**model.encode([example], padding_side=side), output_hidden_states=True, **alone_extra)
        if family in SEQ2SEQ:  # decoder logits (B, T_dec, V); encoder states at the real tokens
            diff = (out.logits[b] - alone.logits[0]).abs().max()
            assert diff < 1e-3, (name, float(diff))  # logits ~10 after T5 rescaling: fp32 sums in another order
            encoder_states = out.last_hidden_state[b][out.attention_mask[b].bool()]
            alone_states = alone.last_hidden_state[0][alone.attention_mask[0].bool()]
            # T5's unscaled fp32 states drift ~1e-5 relative with the batch's padded width (seen on a
            # prompt-tuning row once the batch grew by two rows); test_contract.py allows the same
            torch.testing.assert_close(encoder_states, alone_states, atol=2e-4, rtol=1e-3, msg=name)
            continue
        mine, ref = real(out, b), real(alone, 0)
        assert mine.keys() == ref.keys() and mine
        for key in mine:
            assert torch.allclose(mine[key], ref[key], atol=1e-5), (name, key)
        if alone.answer_logits is not None:
            assert torch.allclose(out.answer_logits[b], alone.answer_logits[0], atol=1e-5), name


@pytest.mark.parametrize("family", CAUSAL)
def test_mixed_answer_logits_only_where_read(family_models, family):
    bank, _ = make_bank(family_models, family)
    names, examples = mixed_rows()
    batch = encode_mixed(bank, names, examples)
    full = forward_mixed(bank, batch)
    answer = forward_mixed(bank, batch, logits="answer")
    assert answer.logits is None and torch.allclose(answer.answer_logits, full.answer_logits, atol=1e-5)


@pytest.mark.parametrize("family", CAUSAL + SEQ2SEQ)
def test_mixed_greedy_generate_rows_equal_rows_alone(family_models, family):
    bank, models = make_bank(family_models, family)
    names, examples = mixed_rows()
    names = same_length_deep(names, family, bank)
    examples = examples[: len(names)]
    if family in SEQ2SEQ:
        # T5 / BART take no position ids: right padding, and their templates end anywhere
        batch = encode_mixed(bank, names, examples, padding_side="right")
    else:
        batch = encode_mixed(bank, names, examples)
    new = generate_mixed(bank, batch, max_new_tokens=6, do_sample=False)
    for b, (name, example) in enumerate(zip(names, examples)):
        model = models[name]
        side = "right" if family in SEQ2SEQ else "left"
        alone = model.generate(**model.encode([example], padding_side=side), max_new_tokens=6, do_sample=False)
        n = alone.shape[1]
        assert new[b, :n].tolist() == alone[0].tolist(), name


def test_bank_loads_replaces_removes_and_evicts(family_models, tmp_path):
    bank, models = make_bank(family_models, "llama", max_on_device=2)
    for name in ("pt", "v2", "dept"):
        models[name].save_pretrained(tmp_path / "prompts" / name)
    loaded = PromptBank.from_directory(bank.base, bank.tokenizer, tmp_path / "prompts")
    assert loaded.names() == ["dept", "pt", "v2"]
    assert torch.equal(loaded["dept"].input_delta, bank["dept"].input_delta)  # the folder's delta, as trained
    names, examples = ["v2", "pt", "dept"], [{"text": "bad"}, {"text": "fine"}, {"text": TEXTS[2]}]
    batch, again = encode_mixed(loaded, names, examples), encode_mixed(bank, names, examples)
    assert torch.equal(forward_mixed(loaded, batch).logits, forward_mixed(bank, again).logits)
    # least recently used tensors leave the device; the batch still runs and gives the same rows
    bank.prompts_for(["pt", "lstm", "mlp"])
    assert bank.on_device() == ["lstm", "mlp"]
    bank.prompts_for(["lstm"])  # used again: the least recently used is now mlp
    bank.prompts_for(["pt"])
    assert sorted(bank.on_device()) == ["lstm", "pt"]
    bank.prompts_for(["dept"])  # its table and its delta move over, and leave together
    assert bank["dept"].delta_on_device is not None
    bank.prompts_for(["lstm", "mlp"])
    assert bank["dept"].on_device is None and bank["dept"].delta_on_device is None
    # replace and remove while serving
    with pytest.raises(sp.ConfigError, match="already loaded"):
        bank.add("pt", models["lstm"])
    bank.add("pt", models["lstm"], replace=True)
    assert bank["pt"].model is models["lstm"]
    bank.remove("pt")
    with pytest.raises(UnknownTaskError, match=r"unknown task 'pt'; loaded tasks: dept, lstm, mlp, prefix, v2"):
        encode_mixed(bank, ["pt"], [{"text": "x"}])
    for bad in ("../etc", ".hidden", "a/b", "", "x" * 65):
        with pytest.raises(sp.ConfigError, match="invalid task name"):
            bank.add(bad, models["v2"])


def test_bank_refuses_a_prompt_of_another_base(family_models, tmp_path):
    bank, models = make_bank(family_models, "llama")
    other, tok = family_models("gpt2")
    with pytest.raises(sp.BaseModelMismatchError, match="saved for another base model"):
        models["v2"].save_pretrained(tmp_path / "v2")
        PromptBank(other, tok).add("v2", tmp_path / "v2")


# Tasks whose rows start with the same tokens: their keys and values are cached once.
CACHED = {
    "lead-virtual": lambda: sp.PromptTuningConfig(template="[P:4] {text} It was [MASK]", init="vocab"),
    "lead-text": lambda: sp.PTuningConfig(template="[P:3] Review: [P:2] {text} Sentiment: [MASK]", encoder="lstm",
                                          encoder_hidden_size=16),
    "not-leading": lambda: sp.PTuningConfig(template="{text} [P:3] It was [MASK]", encoder="mlp",
                                            encoder_hidden_size=16),
    "v2": TASKS["v2"],
}


@pytest.mark.parametrize("family", CAUSAL)
def test_cached_leading_segment_equals_recomputing_it(family_models, family):
    cached, _ = make_bank(family_models, family, CACHED, cache_prompts=True)
    plain, _ = make_bank(family_models, family, CACHED, cache_prompts=False)
    assert {n: (cached[n].lead.length if cached[n].lead else 0) for n in CACHED} == {
        "lead-virtual": 4, "lead-text": 3 + len(cached.tokenizer.encode(" Review:")) + 2, "not-leading": 0, "v2": 0}
    names = list(CACHED) * 2
    examples = [{"text": TEXTS[i % len(TEXTS)]} for i in range(len(names))]
    a, b = encode_mixed(cached, names, examples), encode_mixed(plain, names, examples)
    assert int(a["attention_mask"].sum()) == int(b["attention_mask"].sum()) - 2 * (4 + cached["lead-text"].lead.length)
    out_a = forward_mixed(cached, a, output_hidden_states=True)
    out_b = forward_mixed(plain, b, output_hidden_states=True)
    assert torch.allclose(out_a.answer_logits, out_b.answer_logits, atol=1e-5)
    for row in range(len(names)):
        mine, ref = real(out_a, row), real(out_b, row)
        for key in mine:  # the row's own tokens: the last ones of the recomputed row
            assert torch.allclose(mine[key], ref[key][-mine[key].shape[0]:], atol=1e-5), (names[row], key)
    new_a = generate_mixed(cached, a, max_new_tokens=5, do_sample=False)
    new_b = generate_mixed(plain, b, max_new_tokens=5, do_sample=False)
    assert torch.equal(new_a, new_b)


def test_heads_that_read_every_token_keep_fixed_text_in_the_row(family_models):
    from softprompt.tasks import SequenceClassification

    base, tok = family_models("llama")
    bank = PromptBank(base, tok)
    model = sp.SoftPromptModel(base, CACHED["lead-text"](), tokenizer=tok)
    bank.add("head", model, task=SequenceClassification(["a", "b"], pool="mean"))
    assert bank["head"].lead is None  # "Review:" would vanish from its mean pooling
    bank.add("virtual-only", sp.SoftPromptModel(base, CACHED["lead-virtual"](), tokenizer=tok),
             task=SequenceClassification(["a", "b"], pool="mean"))
    assert bank["virtual-only"].lead.length == 4


@pytest.mark.parametrize("family", CAUSAL)
def test_continuous_batching_rows_equal_rows_alone(family_models, family):
    """Rows join the running batch as others end (max_rows 3 for 10 rows of five tasks,
    budgets of 2..7 tokens, some joining through the admit hook): each row's greedy tokens
    equal generate() on the row alone."""
    from softprompt.serve.decode import Decoder, DecodeRow, Sampling

    bank, models = make_bank(family_models, family, cache_prompts=True)
    names, examples = mixed_rows()
    budgets = [2 + (i * 3) % 6 for i in range(len(names))]
    rows = [DecodeRow(n, e, Sampling(max_new_tokens=k)) for n, e, k in zip(names, examples, budgets)]
    late = rows[7:]
    decoder = Decoder(bank, max_rows=3, admit=lambda room: [late.pop(0) for _ in range(min(room, len(late)))])
    decoder.run(rows[:7])
    assert not late
    for row, name, example, k in zip(rows, names, examples, budgets):
        model = models[name]
        alone = model.generate(**model.encode([example]), max_new_tokens=k, do_sample=False)[0].tolist()
        assert row.tokens == alone, name
    assert decoder.steps < sum(budgets)  # rows shared steps


def test_decoder_sampling_is_seeded_and_top_k_1_is_greedy(family_models):
    from softprompt.serve.decode import Decoder, DecodeRow, Sampling

    bank, _ = make_bank(family_models, "llama")
    names, examples = mixed_rows()

    def run(sampling, seed=0):
        rows = [DecodeRow(n, e, dataclasses.replace(sampling, seed=seed)) for n, e in zip(names, examples)]
        Decoder(bank, max_rows=4).run(rows)
        return [r.tokens for r in rows]

    hot = Sampling(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9)
    assert run(hot) == run(hot) and run(hot) != run(hot, seed=1)
    assert run(Sampling(max_new_tokens=6, do_sample=True, top_k=1)) == run(Sampling(max_new_tokens=6))


@pytest.mark.parametrize("family,side", [("llama", "left"), ("llama", "right"), ("gpt2", "left")])
def test_dept_row_beside_prompt_deep_and_base_rows_equals_it_alone(family_models, family, side):
    """A DePT row shares a batch with prompt-tuning, deep-prompt and base-alone rows (its
    delta stacked per row, zeros for the others): every row's outputs and greedy tokens
    equal the row run alone (forward, generate, and the serving decoder)."""
    from softprompt.serve.decode import Decoder, DecodeRow, Sampling

    bank, models = make_bank(family_models, family, {k: TASKS[k] for k in ("pt", "v2", "dept")})
    bank.add_base("base")
    names = ["dept", "pt", "base", "v2", "dept", "base"]
    examples = [{"text": TEXTS[i % len(TEXTS)]} for i in range(len(names))]
    batch = encode_mixed(bank, names, examples, padding_side=side)
    out = forward_mixed(bank, batch)
    assert bank.prompts_for(batch.entries).input_delta.shape == (6, 5, bank.base.config.hidden_size)
    for b, (name, example) in enumerate(zip(names, examples)):
        alone = forward_mixed(bank, encode_mixed(bank, [name], [example], padding_side=side))
        mine, ref = real(out, b), real(alone, 0)
        assert torch.allclose(mine["logits"], ref["logits"], atol=1e-5), name
        if name in models:  # and the single-task batch is the model's own forward
            with torch.no_grad():
                own = models[name](**models[name].encode([example], padding_side=side))
            assert torch.allclose(real(own, 0)["logits"], ref["logits"], atol=1e-5), name
    left = encode_mixed(bank, names, examples)
    new = generate_mixed(bank, left, max_new_tokens=4, do_sample=False)
    rows = [DecodeRow(n, e, Sampling(max_new_tokens=4)) for n, e in zip(names, examples)]
    Decoder(bank, max_rows=4).run(rows)
    for b, (name, example) in enumerate(zip(names, examples)):
        alone = generate_mixed(bank, encode_mixed(bank, [name], [example]), max_new_tokens=4, do_sample=False)
        assert new[b, : alone.shape[1]].tolist() == alone[0].tolist(), name
        assert rows[b].tokens == alone[0].tolist()[: len(rows[b].tokens)] and rows[b].tokens, name
