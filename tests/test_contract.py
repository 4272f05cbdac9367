"""The contract every method keeps on every model family (DESIGN.md §4).

Each test is parametrised over methods x families and asserts an equivalence that
cannot hold by accident: export == training-time module, padded == unpadded, saved ==
loaded, greedy generate == repeated full forwards, a prompt made of real tokens ==
those tokens, and a frozen base.
"""

from __future__ import annotations


import pytest
import torch

import softprompt as sp
from softprompt import inject
from softprompt.methods.collapsed import CollapsedPrompt

from conftest import CAUSAL, ENCODERS, FAMILIES, SEQ2SEQ

METHODS = {
    "prompt-tuning": lambda: sp.PromptTuningConfig(template="[P:2] {text} [P:2] It was [MASK] .", init="vocab"),
    "p-tuning-lstm": lambda: sp.PTuningConfig(template="{text} [P:3] It was [MASK] .", encoder="lstm", encoder_hidden_size=16),
    "p-tuning-mlp": lambda: sp.PTuningConfig(template="[P:2] {text} [P:1] It was [MASK]", encoder="mlp", encoder_hidden_size=16),
    "prefix-tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=3, template="{text} It was [MASK] .", projection_hidden_size=16),
    "p-tuning-v2": lambda: sp.PTuningV2Config(num_virtual_tokens=3, template="{text} It was [MASK] .", init_std=0.5),
    # S_max 3: every row's real tokens outnumber it, so the delta's cut-off is exercised and
    # greedy decoding's new tokens (outside the delta) equal full forwards over longer rows
    "dept": lambda: sp.DePTConfig(template="[P:1] {text} [P:1] It was [MASK] .", rank=2, max_input_length=3,
                                  init="vocab"),
}
INPUT_METHODS = ("prompt-tuning", "p-tuning-lstm", "p-tuning-mlp", "dept")
DEEP_METHODS = ("prefix-tuning", "p-tuning-v2")
TEXTS = [{"text": "a gem of a film"}, {"text": "bad"}, {"text": "the plot wanders but the cast holds it together"}]
ALL = [(m, f) for m in METHODS for f in FAMILIES]


def build(family_models, family, method):
    base, tok = family_models(family)
    model = sp.SoftPromptModel(base, METHODS[method](), tokenizer=tok).eval()
    if method == "dept":  # B starts at 0 (no delta, no gradient to A): set it as training would
        with torch.no_grad():
            low = model.prompt.low_rank
            low.B.copy_(torch.randn(low.B.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return model, base, tok


def decoder_ids(base, batch_size, length=3):
    start = base.config.decoder_start_token_id
    ids = torch.tensor([[start] + [5 + i for i in range(length - 1)]])
    return ids.expand(batch_size, -1)


def run(model, batch, base):
    extra = {}
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        extra["decoder_input_ids"] = decoder_ids(base, batch["input_ids"].shape[0])
    return model(**batch, **extra)


def scalar_loss(out):
    return out.logits.float().pow(2).mean() if out.logits is not None else out.last_hidden_state.pow(2).mean()


@pytest.mark.parametrize("method,family", ALL)
def test_base_frozen_only_prompt_trains(family_models, method, family):
    model, base, _ = build(family_models, family, method)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    assert all(not p.requires_grad for p in base.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in model.prompt.parameters()) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = scalar_loss(run(model.train(), model.encode(TEXTS[:2]), base))
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [not torch.equal(prompt_before[k], v) for k, v in model.prompt.state_dict().items()]
    assert any(changed)


@pytest.mark.parametrize("method,family", ALL)
def test_export_equals_training_module(family_models, method, family):
    model, base, tok = build(family_models, family, method)
    table = model.export()
    spec = model.spec
    P = model.num_virtual_tokens
    if model.deep:
        assert tuple(table.shape) == (spec.deep_layers, 2, spec.num_key_value_heads, P, spec.head_dim)
    else:
        assert tuple(table.shape) == (P, spec.hidden_size)
    collapsed = sp.SoftPromptModel(base, METHODS[method](), tokenizer=tok,
                                   prompt=CollapsedPrompt(table, spec, deep=model.deep,
                                                          input_delta=model.export_input_delta())).eval()
    batch = model.encode(TEXTS)
    a, b = run(model, batch, base), run(collapsed, batch, base)
    for name in ("logits", "last_hidden_state", "answer_logits"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_gqa_prefix_has_key_value_heads(family_models):
    model, _, _ = build(family_models, "llama", "p-tuning-v2")
    assert model.export().shape == (2, 2, 2, 3, 8)  # L=2, K/V, H_kv=2 (of 4 heads), P=3, D_head=8


@pytest.mark.parametrize("method,family", ALL)
def test_padded_rows_equal_single_rows(family_models, method, family):
    model, base, _ = build(family_models, family, method)
    sides = ["left", "right"] if model.spec.accepts_position_ids else ["right"]
    singles = [run(model, model.encode([ex]), base) for ex in TEXTS]
    for side in sides:
        batch = model.encode(TEXTS, padding_side=side)
        out = run(model, batch, base)
        T = batch["input_ids"].shape[1] - (0 if model.deep else model.num_virtual_tokens)
        assert out.attention_mask.shape == (len(TEXTS), T)  # aligned to real tokens: T, not T + P
        for i, single in enumerate(singles):
            real = out.attention_mask[i].bool()
            assert int(real.sum()) == single.attention_mask.shape[1]
            if model.spec.kind is sp.ModelKind.SEQ2SEQ:
                # T5's unscaled fp32 activations drift ~1e-5 relative between padded and unpadded
                # runs of the bare base model too; a misplaced prompt moves logits by O(1).
                torch.testing.assert_close(out.logits[i], single.logits[0], atol=2e-3, rtol=1e-3)
                torch.testing.assert_close(out.last_hidden_state[i][real], single.last_hidden_state[0], atol=2e-4, rtol=1e-3)
            else:
                torch.testing.assert_close(out.logits[i][real], single.logits[0], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(out.answer_logits[i], single.answer_logits[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method,family", ALL)
def test_save_load_bit_identical(family_models, method, family, tmp_path):
    model, base, tok = build(family_models, family, method)
    # train one step so that the saved prompt is not the initialisation
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scalar_loss(run(model, model.encode(TEXTS[:1]), base)).backward()
    opt.step()
    model.save_pretrained(tmp_path / "prompt")
    assert sorted(p.name for p in (tmp_path / "prompt").iterdir()) == [
        "README.md", "prompt.safetensors", "prompt_config.json", "trainable.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["prompt"]  # no temporary folder left behind
    batch = model.encode(TEXTS)
    expected = run(model, batch, base)
    for trainable in (False, True):
        loaded = sp.SoftPromptModel.from_pretrained(base, tmp_path / "prompt", tokenizer=tok, trainable=trainable).eval()
        assert loaded.template.source == model.template.source
        got = run(loaded, loaded.encode(TEXTS), base)
        for name in ("logits", "last_hidden_state", "answer_logits"):
            x, y = getattr(expected, name), getattr(got, name)
            if x is not None:
                assert torch.equal(x, y), name
        if trainable:
            for (k, v), (k2, v2) in zip(model.prompt.state_dict().items(), loaded.prompt.state_dict().items()):
                assert k == k2 and torch.equal(v, v2)
            assert any(p.requires_grad for p in loaded.parameters())
        else:
            assert not any(p.requires_grad for p in loaded.parameters())


def _greedy_by_forwards(model, base, batch, steps):
    """Decode by re-running the full forward on the growing sequence."""
    ids, mask, pindex = batch["input_ids"], batch["attention_mask"], batch["prompt_index"]
    B = ids.shape[0]
    tokens = []
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        dec = decoder_ids(base, B, length=1)
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=mask, prompt_index=pindex, decoder_input_ids=dec)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            dec = torch.cat([dec, nxt], 1)
        return torch.cat(tokens, 1)
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, prompt_index=pindex)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pindex = torch.cat([pindex, torch.full_like(nxt, -1)], 1)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("method,family", [(m, f) for m in METHODS for f in CAUSAL + SEQ2SEQ])
def test_greedy_generate_equals_full_forwards(family_models, method, family):
    model, base, _ = build(family_models, family, method)
    batch = model.encode(TEXTS[:2])
    # no end-of-sequence stop, so that every row decodes all steps
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert generated.shape == (2, 5)
    expected = _greedy_by_forwards(model, base, batch, 5)
    assert torch.equal(generated, expected)
    # each row alone decodes the same tokens
    for i, ex in enumerate(TEXTS[:2]):
        alone = model.generate(**model.encode([ex]), max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0], generated[i])


@pytest.mark.parametrize("method,family", [(m, f) for m in METHODS for f in CAUSAL + SEQ2SEQ])
def test_sampling_generate(family_models, method, family):
    model, _, _ = build(family_models, family, method)
    batch = model.encode(TEXTS[:2])
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(**batch, max_new_tokens=4, do_sample=True, top_p=0.9, temperature=0.8,
                                   eos_token_id=None))
    assert runs[0].shape == (2, 4)
    assert torch.equal(runs[0], runs[1])  # seeded sampling is reproducible
    assert int(runs[0].max()) < model.spec.vocab_size


@pytest.mark.parametrize("method,family", [(m, f) for m in INPUT_METHODS for f in CAUSAL + ENCODERS + SEQ2SEQ])
def test_input_prompt_of_real_embeddings_equals_those_tokens(family_models, method, family):
    """Rows of the table set to the embeddings of real tokens give exactly the base model's
    output on the sequence with those tokens in the virtual slots (placement and positions)."""
    model, base, _ = build(family_models, family, method)
    P = model.num_virtual_tokens
    filler = torch.arange(1000, 1000 + P)
    table = base.get_input_embeddings()(filler).detach()
    model.prompt = CollapsedPrompt(table, model.spec, deep=False)
    side = "left" if model.spec.accepts_position_ids else "right"
    batch = model.encode(TEXTS, padding_side=side)
    ours = run(model, batch, base)
    ids = torch.where(batch["prompt_index"] >= 0, filler[batch["prompt_index"].clamp(min=0)], batch["input_ids"])
    kwargs = dict(input_ids=ids, attention_mask=batch["attention_mask"])
    if model.spec.accepts_position_ids:
        kwargs["position_ids"] = inject.position_ids(batch["attention_mask"], model.spec)
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        kwargs["decoder_input_ids"] = decoder_ids(base, len(TEXTS))
    reference = base(**kwargs)
    keep = inject.real_token_index(batch["prompt_index"])
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.last_hidden_state, inject.gather_tokens(reference.encoder_last_hidden_state, keep),
                                   atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ours.logits, inject.gather_tokens(reference.logits, keep), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,family", [(m, f) for m in DEEP_METHODS for f in CAUSAL])
def test_deep_prefix_of_real_cache_equals_those_tokens(family_models, method, family):
    """A prefix equal to the base model's own keys/values for P real tokens gives exactly the
    base output on [those tokens + text] at the text's positions (positions start at P)."""
    model, base, _ = build(family_models, family, method)
    P = model.num_virtual_tokens
    filler = torch.arange(1000, 1000 + P).unsqueeze(0)
    cache = inject.output_cache(base(input_ids=filler, use_cache=True))
    prefix = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    model.prompt = CollapsedPrompt(prefix, model.spec, deep=True)
    batch = model.encode(TEXTS, padding_side="left")
    ours = run(model, batch, base)
    for i, ex in enumerate(TEXTS):
        single = model.encode([ex])
        ids = torch.cat([filler, single["input_ids"]], 1)
        reference = base(input_ids=ids).logits[0, P:]
        real = ours.attention_mask[i].bool()
        torch.testing.assert_close(ours.logits[i][real], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,family", ALL)
def test_disabled_prompt_is_the_base_model(family_models, method, family):
    model, base, tok = build(family_models, family, method)
    batch = model.encode(TEXTS[:2], padding_side="right")
    keep = inject.real_token_index(batch["prompt_index"])
    ids = inject.gather_tokens(batch["input_ids"], keep)
    mask = inject.gather_tokens(batch["attention_mask"], keep)
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        kwargs["decoder_input_ids"] = decoder_ids(base, 2)
    reference = base(**kwargs)
    with model.disable_prompt():
        ours = run(model, batch, base)
    with_prompt = run(model, batch, base)
    if model.spec.kind is sp.ModelKind.SEQ2SEQ:
        torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-5)
    else:  # outputs at pads depend on the pads' position ids; compare the real tokens
        real = mask.bool()
        torch.testing.assert_close(ours.logits[real], reference.logits[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_prompt.logits, ours.logits, atol=1e-3)  # the prompt does act


def test_labels_give_next_token_loss_over_real_tokens(family_models):
    model, base, _ = build(family_models, "llama", "p-tuning-lstm")  # virtual tokens in mid-row
    batch = model.encode(TEXTS[:2], padding_side="right")
    keep = inject.real_token_index(batch["prompt_index"])
    labels = inject.gather_tokens(batch["input_ids"], keep).masked_fill(
        inject.gather_tokens(batch["attention_mask"], keep) == 0, -100)
    out = model(**batch, labels=labels)
    # expected: each position of the full row predicts the next position's label; virtual slots have none
    full = torch.full_like(batch["input_ids"], -100).scatter(1, keep, labels)
    with torch.no_grad():
        logits = model(**batch).logits  # aligned; recompute full-row logits through the base
    embeds = inject.place_input_prompts(base.get_input_embeddings()(batch["input_ids"]), batch["prompt_index"], model.export())
    full_logits = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                       position_ids=inject.position_ids(batch["attention_mask"], model.spec)).logits
    expected = torch.nn.functional.cross_entropy(full_logits[:, :-1].reshape(-1, full_logits.shape[-1]),
                                                 full[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert logits.shape[1] == labels.shape[1]


@pytest.mark.parametrize("method,family", [(m, f) for m in METHODS for f in CAUSAL + ENCODERS])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_only_where_read(family_models, method, family, side):
    """logits="answer" gives the same answer logits while a causal LM's head sees only the
    answer columns; logits="none" gives the same hidden states and no logits."""
    model, base, _ = build(family_models, family, method)
    batch = model.encode(TEXTS, padding_side=side)
    full = model(**batch, output_hidden_states=True)
    head = base.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        answer = model(**batch, logits="answer")
        none = model(**batch, output_hidden_states=True, logits="none")
    finally:
        hook.remove()
    assert answer.logits is None and none.logits is None and none.answer_logits is None
    assert torch.allclose(answer.answer_logits, full.answer_logits, atol=1e-5)
    assert torch.allclose(none.last_hidden_state, full.last_hidden_state, atol=1e-6)
    columns = int(torch.unique(batch["answer_index"]).numel())  # 1 with left padding (rows end alike)
    if family in CAUSAL:
        assert seen == [columns, 1]  # the LM head ran on K answer columns, then on one
    with model.disable_prompt():
        assert torch.allclose(model(**batch, logits="answer").answer_logits, model(**batch).answer_logits, atol=1e-5)
    with pytest.raises(sp.ConfigError, match="logits='all'"):
        model(**batch, logits="answer", labels=torch.zeros_like(full.attention_mask))


@pytest.mark.parametrize("family", CAUSAL + ENCODERS + SEQ2SEQ)
def test_the_cache_goes_in_and_comes_out_under_the_installed_name(family_models, family):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (argument and output): the
    one name `inject.CACHE_ARG` must be what the installed base takes (an old name would be
    mapped with a warning until 5.40, then fail) and what its output carries."""
    import inspect

    base, _ = family_models(family)
    takes = inspect.signature(getattr(base, "base_model", base).forward).parameters
    assert inject.CACHE_ARG in takes
    if family in ENCODERS:
        return  # encoders return no cache
    ids = torch.arange(1000, 1004).unsqueeze(0)
    extra = {"decoder_input_ids": ids[:, :2]} if family in SEQ2SEQ else {}
    with torch.no_grad():
        cache = inject.output_cache(base(input_ids=ids, use_cache=True, **extra))
    assert cache is not None and cache.get_seq_length() == (2 if family in SEQ2SEQ else 4)
