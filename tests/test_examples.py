"""The examples run as a user runs them (`python examples/...`), here for a few steps on a tiny
encoder saved like MiniLM: the quickstart trains through the library's own loop
(`softprompt.train`), the second under `transformers.Trainer`; both save a prompt that the
engine serves with SST-2's named labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.data import resolve_data_root

from conftest import make_bert

REPO = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not (resolve_data_root() / "sst2" / "train.tsv").is_file(), reason="no SST-2 data")


@pytest.fixture(scope="module")
def tiny_encoder(wordpiece_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-encoder")
    make_bert(wordpiece_tokenizer).bert.save_pretrained(path)  # a bare encoder, as MiniLM
    wordpiece_tokenizer.save_pretrained(path)
    return path


def run(script: str, *args) -> list[str]:
    r = subprocess.run([sys.executable, str(REPO / "examples" / script), *map(str, args)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()


def answers(lines: list[str]) -> list[dict]:
    found = [json.loads(line) for line in lines if line.startswith('{"')]
    assert len(found) == 2
    for a in found:
        assert a["label"] in ("negative", "positive") and set(a["scores"]) == {"negative", "positive"}
    return found


@needs_data
def test_the_quickstart_trains_with_the_librarys_loop(tiny_encoder, tmp_path):
    source = (REPO / "examples" / "quickstart.py").read_text()
    assert "sp.train(" in source and ".backward(" not in source  # no hand-written loop
    out = tmp_path / "run"
    lines = run("quickstart.py", "--model", tiny_encoder, "--steps", 3, "--eval-every", 0, "--output", out)
    assert any(line.startswith("best dev accuracy") for line in lines)
    answers(lines)
    metrics = json.loads((out / "metrics.json").read_text())
    # the held-out protocol: selected on 1,000 rows held out of train, reported on GLUE dev
    assert metrics["steps"] == 3 and metrics["best"]["n"] == 1000 and metrics["test"]["n"] == 872
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "p-tuning-v2" and config["num_virtual_tokens"] == 16
    assert json.loads((out / "prompt" / "task.json").read_text())["labels"] == ["negative", "positive"]


@needs_data
def test_the_trainer_example_trains_under_transformers_trainer(tiny_encoder, tmp_path):
    source = (REPO / "examples" / "quickstart_trainer.py").read_text()
    assert "Trainer(" in source and ".backward(" not in source
    out = tmp_path / "trainer"
    lines = run("quickstart_trainer.py", "--model", tiny_encoder, "--steps", 3, "--output", out)
    assert any(line.startswith("dev accuracy after 3 steps") for line in lines)
    answers(lines)
    assert (out / "model.safetensors").is_file() and (out / "prompt" / "prompt_config.json").is_file()
    assert json.loads((out / "prompt" / "task.json").read_text())["labels"] == ["negative", "positive"]
