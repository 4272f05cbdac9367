"""lm-evaluation-harness itself (`lm-eval`, the `eval` extra) against the real server on
loopback: its `local-completions` model type **with its default arguments** (token-id
prompts, the server's tokenizer routes found and used, loglikelihood by ``echo`` and
``logprobs``) runs a multiple-choice and a generate_until task from local JSONL (no hub)
against an input-prompt task and a deep-prompt task; every choice's log-likelihood equals
a forward of the task alone (fp32, CPU, within 1e-4), so does every answer chosen."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from softprompt.encode import TokenIds
from softprompt.serve import create_app

from serving import Server
from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    """The tasks' YAML with the JSONL paths made absolute; the datasets library offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("sp_choice", "sp_until"):
        config = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
        shutil.copy(TASKS / f"{name}.jsonl", tmp_path / f"{name}.jsonl")
        config["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / f"{name}.jsonl")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return TaskManager(include_path=str(tmp_path))


def loglikelihood(bank, task: str, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) under the task, by a forward of its model alone."""
    model = bank[task].model
    ids = context + continuation
    batch = model.encode([{"text": TokenIds(ids)}])
    with torch.no_grad():
        out = model(**batch)
    positions = (out.field_index[0] == 0).nonzero().flatten()
    scores = torch.log_softmax(out.logits[0].float(), -1)
    return sum(scores[positions[j] - 1, ids[j]].item() for j in range(len(context), len(ids)))


@pytest.mark.parametrize("task", ["free", "writer"])  # prompt tuning (input), P-tuning v2 (deep)
def test_lm_eval_local_completions_with_its_defaults(causal_bank, tasks, task):
    tok = causal_bank.tokenizer
    with Server(create_app(causal_bank, max_new_tokens=64)) as server:
        out = simple_evaluate(model="local-completions",
                              model_args={"base_url": f"{server.url}/v1/completions", "model": task},
                              tasks=["sp_choice", "sp_until"], task_manager=tasks, log_samples=True)
    samples = out["samples"]["sp_choice"]
    assert len(samples) == 6
    right = 0
    for sample in samples:
        doc = sample["doc"]
        context = tok(doc["question"], add_special_tokens=False)["input_ids"]
        expected = [loglikelihood(causal_bank, task, context, tok(" " + c, add_special_tokens=False)["input_ids"])
                    for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (doc, got, expected)
        right += int(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert out["results"]["sp_choice"]["acc,none"] == pytest.approx(right / len(samples))
    until = out["samples"]["sp_until"]
    assert len(until) == 3 and all(isinstance(s["resps"][0][0], str) for s in until)
