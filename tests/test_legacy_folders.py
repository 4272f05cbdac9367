"""Prompt folders written by an older release still load and answer the same.

The folders in tests/fixtures/legacy_folders/ were written by main at 8a07013, before the layout
of issue 17 moved the code that saves and loads them; expected.json holds what that code answered
(tests/fixtures/legacy_folders/make.py wrote both). Every folder kind the library writes is here:
a `softprompt train` run's prompt with a classification head (P-tuning v2, deep) and with a
token-classification head (prompt tuning), and `save_pretrained` folders of an input prompt with
its LSTM encoder and of a deep prefix with its MLP, with their training-time modules.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import softprompt as sp
from softprompt.base_models import load_base
from softprompt.serve import Engine, PromptBank

from conftest import make_llama

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_folders"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", ["llama-p-tuning", "llama-prefix-tuning"])
@pytest.mark.parametrize("trainable", [False, True])
def test_saved_prompt_of_the_old_release_gives_its_logits_and_tokens(gpt2_tokenizer, name, trainable):
    expected = EXPECTED[name]
    model = sp.SoftPromptModel.from_pretrained(make_llama(gpt2_tokenizer), FIXTURES / name,
                                               tokenizer=gpt2_tokenizer, trainable=trainable)
    batch = model.encode([{"text": t} for t in expected["texts"]])
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits[..., :50], torch.tensor(expected["logits_first_50"]), atol=1e-5, rtol=0)
    assert logits.argmax(-1).tolist() == expected["argmax"]
    assert model.generate(**batch, max_new_tokens=4, do_sample=False).tolist() == expected["generated"]


@pytest.mark.slow
def test_trained_folders_of_the_old_release_serve_the_same_answers():
    base, tokenizer = load_base("minilm")
    bank = PromptBank(base, tokenizer)
    bank.add("sentiment", FIXTURES / "minilm-p-tuning-v2-sst2")
    bank.add("ner", FIXTURES / "minilm-prompt-tuning-wnut17")
    engine = Engine(bank)
    inputs, answers = EXPECTED["engine"]["inputs"], EXPECTED["engine"]["answers"]
    assert engine.classify("ner", inputs["ner"]) == answers["ner"]
    got = engine.classify("sentiment", inputs["sentiment"])
    assert [g["label"] for g in got] == [a["label"] for a in answers["sentiment"]]
    for g, a in zip(got, answers["sentiment"]):
        assert g["scores"] == pytest.approx(a["scores"], abs=2e-6)  # answers carry 6 decimals


@pytest.mark.slow
def test_cli_predicts_and_describes_an_old_folder():
    folder = FIXTURES / "minilm-p-tuning-v2-sst2"
    texts = EXPECTED["engine"]["inputs"]["sentiment"][:2]
    out = subprocess.run(["softprompt", "predict", "--prompt", str(folder), *texts],
                         capture_output=True, text=True, check=True).stdout
    predictions = [json.loads(line)["prediction"] for line in out.splitlines()]
    for got, want in zip(predictions, EXPECTED["engine"]["answers"]["sentiment"][:2], strict=True):
        assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=2e-6)
    info = subprocess.run(["softprompt", "info", str(folder)], capture_output=True, text=True, check=True).stdout
    assert "p-tuning-v2" in info and "minilm" in info
