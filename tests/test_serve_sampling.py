"""Per-row sampling (`serve/sampling.py`): each row draws from its own stream, seeded by its
request or by fresh entropy. The draws follow the filtered softmax; a seeded request gives the
same tokens alone and in any batch (continuous batching and encoder-decoder batches); no
request's seed touches another's randomness, nor torch's global generator; non-finite
scores are flagged, never raised mid-sampling."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import softprompt as sp
from softprompt.serve import Engine, ErrorKind, PromptBank, Request, create_app
from softprompt.serve.decode import Decoder, DecodeRow
from softprompt.serve.sampling import Draws, NonFiniteScoresError, Sampling, row_key, sample

from conftest import make_llama, make_t5
from serving import Server

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.0, -0.5, -1.0, -3.0])
TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together", "fine"]


def draws(samplings, steps, device="cpu"):
    return Draws.of(samplings, steps, torch.device(device))


def hf_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What transformers samples from: its temperature, top-k and top-p warpers, in its order."""
    x = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)[0]


# -- the draw -------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.9)])
def test_draws_over_seeds_follow_the_filtered_softmax(temperature, top_k, top_p):
    n = 2000
    rows = [Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=s) for s in range(n)]
    tokens, finite = sample(LOGITS.expand(n, -1), draws(rows, [0] * n))
    assert finite.all()
    frequency = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    expected = hf_probabilities(LOGITS, temperature, top_k, top_p).double()
    assert (frequency[expected == 0] == 0).all()  # filtered tokens are never drawn
    error = (expected * (1 - expected) / n).sqrt()
    assert ((frequency - expected).abs() <= 4.5 * error + 1e-12).all(), (frequency, expected)
    chi2 = (((frequency - expected) ** 2 / expected.clamp(min=1e-12))[expected > 0]).sum() * n
    assert chi2 < 30  # 7 degrees of freedom at most: p < 1e-4


def test_one_streams_draws_follow_the_softmax_and_are_independent_step_to_step():
    n = 2000
    row = Sampling(do_sample=True, temperature=1.0, seed=12345)
    tokens, _ = sample(LOGITS.expand(n, -1), draws([row] * n, list(range(n))))  # draws 0..n-1 of one stream
    frequency = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    expected = LOGITS.double().softmax(-1)
    assert ((frequency - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt()).all()
    repeats = (tokens[1:] == tokens[:-1]).double().mean()  # independent draws: P(same twice) = sum p**2
    assert abs(repeats - (expected**2).sum()) < 4.5 * math.sqrt(0.25 / n)


def test_a_rows_draw_depends_on_its_seed_and_token_index_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 2
    rows = [Sampling(do_sample=True, temperature=1.2, top_k=[0, 10][b % 2], top_p=[1.0, 0.9][b // 3], seed=1000 + b)
            for b in range(6)]
    steps = [0, 3, 3, 7, 1, 0]
    together, _ = sample(logits, draws(rows, steps))
    alone = [sample(logits[b : b + 1], draws([rows[b]], [steps[b]]))[0].item() for b in range(6)]
    assert together.tolist() == alone
    mixed_rows, mixed_logits, mixed_steps = [], [], []
    for b in [4, 1, 5, 0, 3, 2]:  # other slots, a greedy row before each
        mixed_rows += [None, rows[b]]
        mixed_logits += [logits[(b + 1) % 6], logits[b]]
        mixed_steps += [0, steps[b]]
    tokens, _ = sample(torch.stack(mixed_logits), draws(mixed_rows, mixed_steps))
    assert tokens[1::2].tolist() == [alone[b] for b in [4, 1, 5, 0, 3, 2]]
    assert tokens[0::2].tolist() == torch.stack(mixed_logits[0::2]).argmax(-1).tolist()
    # another seed, another draw number: another stream
    assert row_key(5, 0) != row_key(6, 0) and row_key(5, 0) != row_key(5, 1) and row_key(2**64 - 1, 0) != row_key(0, 0)
    flat = torch.zeros(64, 1000)  # uniform: any two streams agree on 1 draw in 1000
    keys = [Sampling(do_sample=True, seed=s) for s in range(64)]
    assert len(set(sample(flat, draws(keys, [0] * 64))[0].tolist())) > 55
    assert len(set(sample(flat, draws([keys[0]] * 64, range(64)))[0].tolist())) > 55


def test_sampling_leaves_torchs_global_generator_alone():
    state = torch.random.get_rng_state()
    rows = [Sampling(do_sample=True, seed=7), Sampling(do_sample=True), Sampling(do_sample=True, top_p=0.5)]
    sample(torch.randn(3, 20, generator=torch.Generator().manual_seed(1)), draws(rows, [0, 0, 0]))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(0)  # unseeded rows: fresh entropy, not torch's global stream
    a = sample(torch.zeros(1, 10**6), draws([Sampling(do_sample=True)], [0]))[0]
    torch.manual_seed(0)
    b = sample(torch.zeros(1, 10**6), draws([Sampling(do_sample=True)], [0]))[0]
    assert a.item() != b.item()


def test_non_finite_scores_are_flagged_never_raised():
    logits = torch.randn(7, 30, generator=torch.Generator().manual_seed(2))
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    logits[5, 0] = 3e38  # finite, but / 0.5 is not
    rows = [Sampling(do_sample=True, seed=1), Sampling(do_sample=True), None, Sampling(do_sample=True),
            Sampling(do_sample=True, temperature=1e-45), Sampling(do_sample=True, temperature=0.5),
            Sampling(do_sample=True, temperature=1e-45, top_k=3, top_p=0.5)]  # 1e-45: what parse now refuses
    logits[6] = 0.0
    logits[6, 2] = 1.0
    tokens, finite = sample(logits, draws(rows, [0] * 7))
    assert finite.tolist() == [True, False, False, False, False, False, False]
    assert tokens.shape == (7,) and ((tokens >= 0) & (tokens < 30)).all()
    with pytest.raises(RuntimeError):  # what sampling did before: torch.multinomial on NaN probabilities
        torch.multinomial((logits[4:5] / torch.tensor(1e-45)).softmax(-1), 1)


# -- the decoder (continuous batching) and the engine ----------------------------------------
def two_tasks(base, tok) -> PromptBank:
    """A deep-prompt task and an input-prompt task on one base."""
    bank = PromptBank(base.eval(), tok)
    torch.manual_seed(0)
    bank.add("writer", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}",
                                                                   init_std=0.5), tokenizer=tok))
    bank.add("free", sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:4] {text}"), tokenizer=tok))
    return bank


@pytest.fixture
def causal_bank(gpt2_tokenizer):
    return two_tasks(make_llama(gpt2_tokenizer), gpt2_tokenizer)


@pytest.fixture
def seq2seq_bank(wordpiece_tokenizer):
    return two_tasks(make_t5(wordpiece_tokenizer), wordpiece_tokenizer)


SEEDED = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 40, "seed": 2**64 - 5}


def generation(task, text, **options):
    return Request(task, text, generate=True, options={"max_new_tokens": 8, **options})


def neighbours():
    """Requests of every kind around the seeded one: greedy, other seeds and settings, unseeded."""
    return [generation("free", TEXTS[1], temperature=0), generation("writer", TEXTS[2], temperature=0.8, seed=9),
            generation("free", TEXTS[3], temperature=1.0, top_p=0.9), generation("writer", TEXTS[1], temperature=2.0),
            generation("writer", TEXTS[0], temperature=0, max_new_tokens=3)]


@pytest.mark.parametrize("bank_name", ["causal_bank", "seq2seq_bank"])
def test_a_seeded_request_gives_the_same_tokens_alone_and_in_any_batch(request, bank_name):
    bank = request.getfixturevalue(bank_name)
    engine = Engine(bank, max_batch_rows=3)
    alone = engine.run([generation("writer", TEXTS[0], **SEEDED)])[0]
    assert alone.ok and alone.new_tokens > 0, alone.error
    assert engine.run([generation("writer", TEXTS[0], **SEEDED)])[0].output == alone.output  # reproducible
    others = neighbours()
    for place in (0, 2, 5):  # first, among, last: other slots, other batches
        batch = others[:place] + [generation("writer", TEXTS[0], **SEEDED)] + others[place:]
        results = engine.run(batch)
        assert all(r.ok for r in results), [r.error for r in results]
        assert results[place].output == alone.output, place
    other_seed = engine.run([generation("writer", TEXTS[0], **{**SEEDED, "seed": 3})])[0]
    assert other_seed.output != alone.output


def test_a_seeded_row_joining_mid_decode_gives_its_tokens_alone(causal_bank):
    engine = Engine(causal_bank, max_batch_rows=4)
    alone = engine.run([generation("writer", TEXTS[0], **SEEDED)])[0]
    late = [generation("writer", TEXTS[0], **SEEDED), *neighbours()[:2]]
    got = []
    calls = []

    def admit(room):  # the seeded row arrives after the running rows decoded a few steps
        calls.append(room)
        if len(calls) < 4 or not late:
            return []
        return [(late.pop(0), got.append) for _ in range(min(room, len(late)))]

    running = [generation("free", TEXTS[2], temperature=0, max_new_tokens=8),
               generation("writer", TEXTS[1], temperature=1.0, max_new_tokens=8)]
    results = engine.run(running, admit=admit)
    assert all(r.ok for r in results + got) and not late
    assert got[0].output == alone.output


def test_decoder_rows_with_one_seed_and_prompt_draw_alike_and_differ_from_others(causal_bank):
    def run(seeds):
        rows = [DecodeRow("writer", {"text": TEXTS[0]}, Sampling(max_new_tokens=6, do_sample=True, temperature=2.0,
                                                                 seed=s)) for s in seeds]
        Decoder(causal_bank, max_rows=4).run(rows)
        return [r.tokens for r in rows]

    first = run([1, 2, 1, 3])
    assert first[0] == first[2] and first[0] != first[1] and first[1] != first[3]
    assert run([1])[0] == first[0]


@pytest.mark.parametrize("bank_name", ["causal_bank", "seq2seq_bank"])
def test_another_requests_seed_does_not_steer_an_unseeded_one(request, bank_name):
    bank = request.getfixturevalue(bank_name)
    engine = Engine(bank)
    state = torch.random.get_rng_state()
    outputs = []
    for _ in range(3):
        results = engine.run([generation("writer", TEXTS[0], temperature=2.0, max_new_tokens=10),
                              generation("writer", TEXTS[0], temperature=2.0, max_new_tokens=10, seed=7)])
        outputs.append(results[0].output)
    assert len(set(outputs)) == 3, outputs  # the old shared generator: the same "random" text each time
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing seeds or draws from torch's generator
    torch.manual_seed(0)
    a = engine.run([generation("writer", TEXTS[0], temperature=2.0, max_new_tokens=10)])[0].output
    torch.manual_seed(0)
    b = engine.run([generation("writer", TEXTS[0], temperature=2.0, max_new_tokens=10)])[0].output
    assert a != b


def test_encoder_decoder_rows_of_any_settings_share_one_generate(seq2seq_bank):
    engine = Engine(seq2seq_bank)
    requests = [generation("writer", TEXTS[0], **SEEDED), generation("free", TEXTS[1], temperature=0),
                generation("writer", TEXTS[2], temperature=0.5, top_p=0.8, seed=4),
                generation("free", TEXTS[3], temperature=1.0, stop=["x"])]
    results = engine.run(requests)
    assert all(r.ok for r in results), [r.error for r in results]
    assert engine.batches == [("generate", 4)]
    greedy = engine.run([generation("free", TEXTS[1], temperature=0)])[0]
    assert results[1].output == greedy.output


def nan_prompt(bank, name="broken"):
    model = sp.SoftPromptModel(bank.base, sp.PromptTuningConfig(template="[P:4] {text}"), tokenizer=bank.tokenizer)
    with torch.no_grad():
        model.prompt.embedding.fill_(float("nan"))
    bank.add(name, model)


def test_non_finite_scores_in_the_decoder_fail_that_row_alone_not_multinomial(causal_bank):
    nan_prompt(causal_bank)
    rows = [DecodeRow("writer", {"text": "x"}, Sampling(max_new_tokens=4, do_sample=True, seed=1)),
            DecodeRow("broken", {"text": "x"}, Sampling(max_new_tokens=4, do_sample=True, seed=1))]
    Decoder(causal_bank, max_rows=4).run(rows)
    alone = [DecodeRow("writer", {"text": "x"}, Sampling(max_new_tokens=4, do_sample=True, seed=1))]
    Decoder(causal_bank, max_rows=4).run(alone)
    assert rows[0].error is None and rows[0].tokens == alone[0].tokens and len(alone[0].tokens) == 4
    assert isinstance(rows[1].error, NonFiniteScoresError) and "not finite" in str(rows[1].error)
    greedy = [DecodeRow("broken", {"text": "x"}, Sampling(max_new_tokens=4))]  # greedy NaN rows are caught too
    Decoder(causal_bank, max_rows=4).run(greedy)
    assert isinstance(greedy[0].error, NonFiniteScoresError)
    results = Engine(causal_bank).run([generation("writer", "x", temperature=1.0, seed=1),
                                       generation("broken", "x", temperature=1.0)])
    assert results[0].ok and results[1].error_kind is ErrorKind.FAILED and "not finite" in results[1].error


def test_non_finite_scores_in_an_encoder_decoder_batch_fail_that_row_alone(seq2seq_bank):
    nan_prompt(seq2seq_bank)
    engine = Engine(seq2seq_bank)
    results = engine.run([generation("writer", TEXTS[0], **SEEDED), generation("broken", "x", temperature=1.0),
                          generation("free", TEXTS[1], temperature=0)])
    assert engine.batches == [("generate", 3)]  # one batch ran: no retry needed
    assert results[0].ok and results[2].ok
    assert results[1].error_kind is ErrorKind.FAILED and "not finite" in results[1].error
    assert results[0].output == engine.run([generation("writer", TEXTS[0], **SEEDED)])[0].output


# -- the options, where a request enters -----------------------------------------------------
def test_out_of_range_sampling_options_are_refused_before_any_batch(causal_bank):
    engine = Engine(causal_bank)
    results = engine.run([generation("writer", "x", temperature=1.0, seed=2**70),
                          generation("writer", "x", temperature=1e-45), generation("writer", "x", temperature=0)])
    assert [r.error_kind for r in results[:2]] == [ErrorKind.BAD_INPUT, ErrorKind.BAD_INPUT] and results[2].ok
    assert "seed: 1180591620717411303424 is out of range" in results[0].error
    assert "temperature: 1e-45 is out of range" in results[1].error and "send 0 for greedy" in results[1].error
    assert engine.batches == [("decode", 1)]  # the refused ones never reached the decoder


def test_http_refuses_bad_sampling_options_and_treats_empty_stops_alike(causal_bank):
    with Server(create_app(causal_bank)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        def complete(**body):
            return client.post("/v1/completions", json={"model": "writer", "prompt": TEXTS[0], "max_tokens": 6,
                                                        **body})

        r = complete(seed=2**70)
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"] and "18446744073709551615" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "seed"
        r = complete(temperature=1e-45)
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"] and "0 (greedy)" in r.json()["error"]["message"]
        r = complete(stop=["a", "b", "c", "d", "e"])
        assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"] and r.json()["error"]["param"] == "stop"
        plain = complete(temperature=0).json()["choices"][0]["text"]
        assert plain and complete(temperature=0, stop="").json()["choices"][0]["text"] == plain
        assert complete(temperature=0, stop=[""]).json()["choices"][0]["text"] == plain
        seeded = [complete(temperature=1.0, seed=11).json()["choices"][0]["text"] for _ in range(2)]
        assert seeded[0] == seeded[1]


def test_seeded_rows_on_fixed_slots_stepping_ahead_draw_as_alone(causal_bank):
    """Fixed slots launch the next step before the host reads this one's tokens: a sampling
    row's draw index counts the token still on its way, rows ending (budget, end of
    sequence) and joining meanwhile take no token of a step launched for another row; each
    seeded row == the row alone on eager slots."""
    def rows():
        return [DecodeRow("writer", {"text": TEXTS[i % 3]}, Sampling(max_new_tokens=3 + 4 * i, do_sample=True,
                                                                     temperature=1.5, top_k=20, seed=i))
                for i in range(6)] + [DecodeRow("free", {"text": TEXTS[1]}, Sampling(max_new_tokens=9))]

    fixed = rows()
    decoder = Decoder(causal_bank, max_rows=3, graphs=True)  # 7 rows through 3 slots: rows join as others end
    ahead = []
    launch = decoder._launch
    decoder._launch = lambda before: ahead.append(before is not None) or launch(before)
    decoder.run(fixed)
    assert any(ahead) and not all(ahead)  # steps were launched ahead, and not past the last token
    expected = rows()
    for row in expected:
        Decoder(causal_bank, max_rows=1, graphs=False).run([row])
    assert [r.tokens for r in fixed] == [r.tokens for r in expected]
    assert all(r.error is None for r in fixed)
    assert [len(r.tokens) for r in fixed[:6]] == [3 + 4 * i for i in range(6)]
