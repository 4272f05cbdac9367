"""lm-evaluation-harness itself (`lm-eval`, the `eval` extra) against the real server on
loopback: its `local-completions` model type **with its default arguments** (token-id
prompts, the server's tokenizer routes found and used, loglikelihood by ``echo`` and
``logprobs``) runs a multiple-choice and a generate_until task from local JSONL (no hub)
against an input-prompt task and a deep-prompt task; every choice's log-likelihood equals
a forward of the task alone (fp32, CPU, within 1e-4), so does every answer chosen; lm-eval
in process on the same tasks (`softprompt.harness.SoftPromptLM`) gives the same scores and
generations as through the server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from softprompt.encode import TokenIds
from softprompt.harness import SoftPromptLM
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

    # in process, no server (`softprompt.harness.SoftPromptLM`): the same scores and answers
    local = simple_evaluate(model=SoftPromptLM(causal_bank, task, batch_size=4), tasks=["sp_choice", "sp_until"],
                            task_manager=tasks, log_samples=True)
    for name in ("sp_choice", "sp_until"):
        for served, here in zip(out["samples"][name], local["samples"][name]):
            assert served["doc"] == here["doc"]
            if name == "sp_choice":
                a, b = [r[0][0] for r in served["resps"]], [r[0][0] for r in here["resps"]]
                assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
                assert [r[0][1] for r in served["resps"]] == [r[0][1] for r in here["resps"]]
            else:
                assert served["resps"] == here["resps"]
    assert local["results"]["sp_choice"]["acc,none"] == out["results"]["sp_choice"]["acc,none"]


def test_softprompt_eval_harness_on_a_prompt_folder_and_on_the_base(gpt2_tokenizer, tasks, tmp_path):
    """`softprompt eval --harness` (in process): a saved prompt folder, and the base alone
    (`--model` without `--prompt`), each scored as `SoftPromptLM` scores them."""
    import json

    import softprompt as sp
    from typer.testing import CliRunner

    from conftest import make_gpt2
    from softprompt.cli import app
    from softprompt.serve import PromptBank

    base_dir, folder = tmp_path / "tiny-gpt2", tmp_path / "prompt"
    base = make_gpt2(gpt2_tokenizer)
    base.save_pretrained(base_dir)
    gpt2_tokenizer.save_pretrained(base_dir)
    torch.manual_seed(0)
    sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:4] {text}"),
                       tokenizer=gpt2_tokenizer).save_pretrained(folder)
    include = str(tmp_path)  # where the `tasks` fixture wrote the task YAML (the same tmp_path)
    for args, build in [(["--prompt", folder], lambda bank: bank.add("prompt", folder) and "prompt"),
                        ([], lambda bank: bank.add_base("base") and "base")]:
        r = CliRunner().invoke(app, ["eval", "--harness", "sp_choice", "--model", str(base_dir), "--include-path",
                                     include, *map(str, args)])
        assert r.exit_code == 0, r.output
        results = json.loads(r.stdout.strip().splitlines()[-1])  # progress bars go to stderr
        bank = PromptBank(base, gpt2_tokenizer)
        name = build(bank)
        expected = simple_evaluate(model=SoftPromptLM(bank, name), tasks=["sp_choice"], task_manager=tasks)
        assert results["sp_choice"]["acc,none"] == expected["results"]["sp_choice"]["acc,none"]


def test_lm_eval_local_chat_completions_runs_a_generate_until_task(causal_bank, tasks):
    """lm-eval's chat model type: the messages through the server's chat template, the answer
    cut at the task's until strings; each equals the chat completion sent by hand."""
    import openai

    causal_bank.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                           "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        with Server(create_app(causal_bank, max_new_tokens=64)) as server:
            out = simple_evaluate(model="local-chat-completions",
                                  model_args={"base_url": f"{server.url}/v1/chat/completions", "model": "writer"},
                                  tasks=["sp_until"], task_manager=tasks, log_samples=True, apply_chat_template=True)
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
            for sample in out["samples"]["sp_until"]:
                by_hand = client.chat.completions.create(
                    model="writer", messages=[{"role": "user", "content": sample["doc"]["question"]}], max_tokens=8,
                    temperature=0, stop=["\n", "."]).choices[0].message.content
                assert sample["resps"][0][0] == by_hand
            assert any(sample["resps"][0][0] for sample in out["samples"]["sp_until"])  # text came back
    finally:
        causal_bank.tokenizer.chat_template = None


def test_a_refused_request_shows_the_servers_message_in_lm_eval(causal_bank, tasks, caplog):
    """A request the server refuses (here: more new tokens than its limit) answers 400 in
    OpenAI's error body, and lm-eval logs that message before it gives up."""
    import logging

    with Server(create_app(causal_bank, max_new_tokens=4)) as server:  # sp_until asks for 8
        with caplog.at_level(logging.WARNING), pytest.raises(Exception):
            simple_evaluate(model="local-completions",
                            model_args={"base_url": f"{server.url}/v1/completions", "model": "writer",
                                        "max_retries": 1},
                            tasks=["sp_until"], task_manager=tasks)
    assert "max_tokens: 8 is over the server's limit of 4" in caplog.text
    assert '"param":"max_tokens"' in caplog.text.replace(" ", "")
