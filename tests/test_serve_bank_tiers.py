"""The prompt bank's levels (`serve/bank.py`): tasks registered without being read and read
on their first request, a cap on the tasks in host memory (the least recently used read
again from their folders), reads ahead of requests (`prefetch`), and `/v1/models`'
description of tasks not in memory. Every answer equals the answer of a bank that read
every folder at start-up."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import softprompt as sp
from softprompt.errors import ConfigError, PromptFileError
from softprompt.folder import save_with_task
from softprompt.serve import Engine, PromptBank, Request, UnknownTaskError
from softprompt.tasks import SequenceClassification

TEXTS = ["a gem of a film", "bad", "the plot wanders but the cast holds it together"]


@pytest.fixture
def saved(family_models, tmp_path):
    """Three prompt folders on one tiny Llama: a deep prompt with a classifier head, an
    input prompt (served from a cached K/V segment), P-tuning with anchors."""
    base, tok = family_models("llama")
    specs = {
        "sentiment": (sp.PTuningV2Config(num_virtual_tokens=4, template="{text}", init_std=0.5),
                      SequenceClassification(["neg", "pos"], pool="last")),
        "free": (sp.PromptTuningConfig(template="[P:3] {text}", init="vocab"), None),
        "review": (sp.PTuningConfig(template="Review: [P:2] {text} [P:1]", encoder="mlp", encoder_hidden_size=16),
                   None),
    }
    root = tmp_path / "prompts"
    for i, (name, (config, task)) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = sp.SoftPromptModel(base, config, tokenizer=tok).eval()
        if task is None:
            model.save_pretrained(root / name)
        else:
            task.bind(model)
            save_with_task(model, task, root / name, {})
    return base, tok, root


def requests():
    return [Request("sentiment", TEXTS[0]), Request("free", TEXTS[1], generate=True, options={"max_new_tokens": 3}),
            Request("review", TEXTS[2], generate=True, options={"max_new_tokens": 3}), Request("sentiment", TEXTS[1])]


def answers(bank):
    results = Engine(bank).run(requests())
    assert all(r.ok for r in results), [r.error for r in results]
    return [r.output for r in results]


def test_registered_tasks_are_read_on_first_request_and_answer_as_loaded_ones(saved):
    base, tok, root = saved
    eager = PromptBank.from_directory(base, tok, root)
    lazy = PromptBank.from_directory(base, tok, root, lazy=True)
    assert eager.reads == 3 and lazy.reads == 0 and lazy.loaded() == []
    assert lazy.names() == eager.names() == ["free", "review", "sentiment"] and len(lazy) == 3 and "free" in lazy
    for name in lazy.names():  # /v1/models reads no folder
        assert lazy.describe(name) == eager.describe(name), name
    assert lazy.reads == 0
    assert lazy.describe("free")["kind"] == "input" and lazy.describe("sentiment") == {
        "method": "p-tuning-v2", "kind": "deep", "num_virtual_tokens": 4, "template": "{text}",
        "task": "classification"}
    assert answers(lazy) == answers(eager)
    assert lazy.reads == 3 and sorted(lazy.loaded()) == lazy.names()
    answers(lazy)
    assert lazy.reads == 3  # in memory now: not read again


def test_a_cap_on_tasks_in_memory_reads_the_least_recently_used_again(saved):
    base, tok, root = saved
    expected = answers(PromptBank.from_directory(base, tok, root))
    bank = PromptBank.from_directory(base, tok, root, max_in_memory=1)
    assert bank.reads == 3 and len(bank.loaded()) == 1  # read at start-up; two dropped again
    for _ in range(2):
        assert answers(bank) == expected
        assert len(bank.loaded()) == 1
    assert bank.reads > 3
    bank["review"]
    reads = bank.reads
    bank["review"]  # the one in memory
    assert bank.reads == reads and bank.loaded() == ["review"]
    with pytest.raises(ConfigError, match="max_in_memory must be a positive integer"):
        PromptBank(base, tok, max_in_memory=0)


def test_tasks_given_as_models_stay_in_memory_under_the_cap(saved):
    base, tok, root = saved
    bank = PromptBank.from_directory(base, tok, root, lazy=True, max_in_memory=1)
    mine = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}"), tokenizer=tok).eval()
    bank.add("mine", mine)
    bank.add_base("model")
    for name in ("free", "review", "sentiment"):
        bank[name]
    assert sorted(bank.loaded()) == ["mine", "model", "sentiment"]


def test_prefetch_reads_ahead_once_even_under_concurrent_requests(saved):
    base, tok, root = saved
    bank = PromptBank.from_directory(base, tok, root, lazy=True)
    bank.prefetch(["free", "free", "nope", "model"])  # unknown names are left to the request's lookup
    deadline = time.monotonic() + 30
    while "free" not in bank.loaded() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bank.loaded() == ["free"] and bank.reads == 1
    entries, barrier = [], threading.Barrier(8)

    def lookup():
        barrier.wait()
        entries.append(bank["review"])

    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bank.reads == 2 and len({id(e) for e in entries}) == 1  # one read, one entry for all eight


def test_a_folder_broken_after_registration_fails_its_requests_only(saved):
    base, tok, root = saved
    bank = PromptBank.from_directory(base, tok, root, lazy=True)
    prompt = root / "free" / "prompt.safetensors"
    prompt.write_bytes(prompt.read_bytes()[:40])  # truncated on disk after start-up
    results = Engine(bank).run(requests())
    assert [r.ok for r in results] == [True, False, True, True]
    assert "free" in results[1].error and "prompt.safetensors" in results[1].error
    with pytest.raises(PromptFileError, match="prompt_config.json"):
        bank.register("empty", root.parent)  # not a prompt folder: refused at once
    with pytest.raises(ConfigError, match="already loaded"):
        bank.register("review", root / "review")


def test_remove_and_replace_registered_tasks(saved):
    base, tok, root = saved
    bank = PromptBank.from_directory(base, tok, root, lazy=True)
    bank.remove("free")
    assert "free" not in bank and bank.names() == ["review", "sentiment"]
    with pytest.raises(UnknownTaskError, match="unknown task 'free'"):
        bank["free"]
    bank.register("sentiment", root / "review", replace=True)
    assert bank["sentiment"].method == "p-tuning" and bank.reads == 1
    bank.add("review", root / "sentiment", replace=True)  # read now, and still reloadable from its folder
    assert bank.describe("review")["method"] == "p-tuning-v2" and bank.reads == 2
