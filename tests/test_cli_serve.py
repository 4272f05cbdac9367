"""`softprompt serve` end to end, as a user runs it: two prompts trained with the CLI (two
tasks, two methods) served by the real command in a subprocess on loopback, read at start-up and read
lazily (--lazy, one task in memory at a time); interleaved concurrent requests get the
answers `softprompt predict` gives. A causal base is served
alone under its own name (--model's folder name, or --base-name), a task of that name refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from softprompt.errors import ConfigError

from serving import free_port, wait_until_serving
from test_cli_train import bert_dir, gpt2_dir, invoke, last_json, reviews  # noqa: F401 (fixtures)

NER = [("Anna lives in Paris", "B-PER O O B-LOC"), ("Paris is big", "B-LOC O O"), ("I met Anna", "O O B-PER"),
       ("Tom left Rome", "B-PER O B-LOC")]


def test_serve_two_trained_prompts_of_different_tasks_and_methods(bert_dir, reviews, tmp_path):  # noqa: F811
    conll = tmp_path / "ner.conll"
    conll.write_text("\n".join("\n".join(f"{w}\t{t}" for w, t in zip(s.split(), tags.split())) + "\n"
                               for s, tags in NER))
    common = ["--model", bert_dir, "--set", "train.steps=8", "--set", "train.eval_every=4", "--set",
              "train.batch_size=4", "--set", "train.progress=false", "--set", "train.lr=0.1", "--set", "train.head_lr=0.1"]
    r = invoke("train", *common, "--method", "p-tuning-v2", "--task", "classification", "--train", reviews, "--eval",
               reviews, "--field", "review:text", "--output", tmp_path / "run-sentiment", "-P", "4")
    assert r.exit_code == 0, r.output
    r = invoke("train", *common, "--method", "prompt-tuning", "--task", "ner", "--train", conll, "--eval", conll,
               "--output", tmp_path / "run-ner", "-P", "3")
    assert r.exit_code == 0, r.output
    prompts = tmp_path / "prompts"
    shutil.copytree(tmp_path / "run-sentiment" / "prompt", prompts / "sentiment")
    shutil.copytree(tmp_path / "run-ner" / "prompt", prompts / "ner")
    texts = ["a gem of a film", "tedious", "great fun", "a dull mess"]
    sentences = [s for s, _ in NER]
    expected = {}
    for name, inputs in (("sentiment", texts), ("ner", sentences)):
        r = invoke("predict", "--prompt", prompts / name, "--model", bert_dir, *inputs)
        assert r.exit_code == 0, r.output
        for x, line in zip(inputs, [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]):
            expected[(name, x)] = line["prediction"]

    # read at start-up; then registered only, each read on its first request, one in memory at a time
    for levels in ([], ["--lazy", "--max-in-memory", "1"]):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(bert_dir),
                                   "--prompts", str(prompts), "--port", str(port), *levels], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(url, server)
            jobs = [("sentiment", texts[i % 4]) if i % 2 else ("ner", sentences[i % 4]) for i in range(40)]

            def call(job):
                name, x = job
                endpoint = "/v1/tag" if name == "ner" else "/v1/classify"
                r = httpx.post(f"{url}{endpoint}", json={"task": name, "inputs": [x]}, timeout=30)
                assert r.status_code == 200, r.text
                return job, r.json()["results"][0]

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(call, jobs))
            for (name, x), got in answers:
                want = expected[(name, x)]
                if name == "ner":
                    assert got["tags"] == want
                else:
                    assert got["label"] == want["label"] and got["scores"].keys() == want["scores"].keys()
                    for label, score in want["scores"].items():
                        assert abs(got["scores"][label] - score) < 1e-5
            models = httpx.get(f"{url}/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["ner", "sentiment"]
            assert [(m["kind"], m["method"], m["task"]) for m in models] == [
                ("input", "prompt-tuning", "ner"), ("deep", "p-tuning-v2", "classification")]
        finally:
            server.terminate()
            _, err = server.communicate(timeout=30)
        assert f"serving 2 task(s) (ner, sentiment) on {bert_dir} (cpu) at http://127.0.0.1:{port}" in err


def test_serve_refuses_what_it_could_never_serve_before_loading_the_model(tmp_path):
    """A key no client can send (before: accepted, and no request could ever match it), a
    limit that is not a positive number, a connection cap the process cannot hold: one
    error line each, before the model loads (its path here does not exist)."""
    common = ["serve", "--model", tmp_path / "no-model", "--prompts", tmp_path]
    for options, message in [
        (["--api-key", "clé"], "error: the API key has 'é' at character 2: a key is sent in an HTTP header"),
        (["--api-key", "tab\tkey"], "error: the API key has '\\t' at character 3"),
        (["--api-key", " key"], "error: the API key starts or ends with a blank"),
        (["--timeout-header", "0"], "error: --timeout-header must be a positive finite number, got 0.0"),
        (["--timeout-graceful-shutdown", "inf"], "error: --timeout-graceful-shutdown must be a positive finite"),
        (["--max-connections", "-1"], "error: --max-connections must be a positive finite number, got -1"),
        (["--max-connections", str(10**9)], "open files"),
    ]:
        r = invoke(*common, *options)
        assert r.exit_code == 1 and message in r.output, (options, r.output)
        assert "Traceback" not in r.output and "no-model" not in r.output


def _prompts_for(model_dir, tmp_path, *names):
    """A prompts folder with a saved prompt of each name on the model at `model_dir`."""
    import softprompt as sp
    from softprompt.base_models import load_base

    base, tok = load_base(str(model_dir))
    prompts = tmp_path / "prompts"
    for i, name in enumerate(names):
        torch.manual_seed(i)
        sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:2] {text}", init="vocab"),
                           tokenizer=tok).save_pretrained(prompts / name)
    return prompts, base, tok


def test_serve_answers_the_base_model_alone_under_its_folder_name(gpt2_dir, tmp_path):  # noqa: F811
    """A causal base is served alone next to the tasks, named after --model's folder; a
    completion on that name is the bare base's greedy generate(), here with --compile (the
    prefill compiled at start-up, before the server listens)."""
    prompts, base, tok = _prompts_for(gpt2_dir, tmp_path, "writer")
    ids = tok("a gem of a film", return_tensors="pt")["input_ids"]
    new = base.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    want = tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(gpt2_dir),
                               "--prompts", str(prompts), "--port", str(port), "--compile"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, server)
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert sorted(models) == ["tiny-gpt2", "writer"] and models["tiny-gpt2"]["kind"] == "base"
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-gpt2", "prompt": "a gem of a film",
                                                      "max_tokens": 5, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert f"serving 1 task(s) (writer) and the base model as 'tiny-gpt2' on {gpt2_dir} (cpu)" in err
    assert "would wait for; ran tiny-gpt2, writer)" in err, err  # no prefix; the cached prompt


def test_serve_refuses_a_task_named_as_the_base(gpt2_dir, tmp_path):  # noqa: F811
    prompts, _, _ = _prompts_for(gpt2_dir, tmp_path, "tiny-gpt2", "gpt")
    r = invoke("serve", "--model", gpt2_dir, "--prompts", prompts, "--port", free_port())
    assert r.exit_code == 1 and "error: 'tiny-gpt2' is a loaded task's name: the base model needs another name " \
        "to be served under (softprompt serve --base-name)" in r.output, r.output
    r = invoke("serve", "--model", gpt2_dir, "--prompts", prompts, "--base-name", "gpt")
    assert r.exit_code == 1 and "error: 'gpt' is a loaded task's name" in r.output, r.output
    r = invoke("serve", "--model", gpt2_dir, "--prompts", prompts, "--base-name", "a/b")
    assert r.exit_code == 1 and "error: invalid task name 'a/b'" in r.output, r.output


def test_the_base_name_is_the_model_argument_as_given():
    from softprompt.serve.launch import base_name_of as _base_name

    assert _base_name("smollm2-135m-instruct", None) == "smollm2-135m-instruct"
    assert _base_name("HuggingFaceTB/SmolLM2-135M/", None) == "SmolLM2-135M"
    assert _base_name("whatever", "mine") == "mine"
    with pytest.raises(ConfigError, match="gives the base model the name 'my model'.*--base-name"):
        _base_name("org/my model", None)


def test_serve_tasks_named_one_by_one(gpt2_dir, tmp_path):  # noqa: F811
    """`--prompt NAME=PATH` (repeatable, beside or instead of --prompts) serves a folder
    under the name given; a malformed or clashing pair is refused before the model loads."""
    prompts, _, _ = _prompts_for(gpt2_dir, tmp_path, "writer", "poet")
    for options, message in [
        (["--prompt", "writer"], "expected NAME=PATH"),
        (["--prompt", f"a/b={prompts / 'writer'}"], "task name"),
        (["--prompt", f"w={tmp_path / 'missing'}"], "does not exist"),
        (["--prompt", f"w={prompts / 'writer'}", "--prompt", f"w={prompts / 'poet'}"], "given twice"),
        (["--prompts", prompts, "--prompt", f"poet={prompts / 'writer'}"], "also a sub-folder of --prompts"),
        ([], "give the tasks to serve"),
        (["--prompt", f"w={prompts / 'writer'}", "--admin"], "--admin needs --prompts"),
    ]:
        r = invoke("serve", "--model", tmp_path / "no-model", *options)
        assert r.exit_code == 1 and message in r.output and "no-model" not in r.output, (options, r.output)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(gpt2_dir),
                               "--prompt", f"story={prompts / 'writer'}", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, server)
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert sorted(models) == ["story", "tiny-gpt2"] and models["story"]["method"] == "prompt-tuning"
    finally:
        server.terminate()
        server.communicate(timeout=30)
