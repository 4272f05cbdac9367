"""The Hugging Face Hub round trip: push a prompt, load it back by ``user/repo[@revision][:subdir]``
from Python, the CLI and the serving bank; the cache, offline mode, partial downloads, and
the base model's Hub id in model cards and PEFT adapters.

No network: the Hub is `fake_hub.FakeHub`, a stand-in on 127.0.0.1 that answers the routes
`huggingface_hub` calls. `huggingface_hub` itself runs unchanged (snapshot_download, its
cache, its offline mode, HfApi's uploads), pointed at the stand-in through the environment
variables a user would set (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

import softprompt as sp
from softprompt.base_models import hub_id, load_base
from softprompt.errors import ConfigError, PromptFileError
from softprompt.io.hub import HubLocation, push_prompt_folder, resolve_prompt_source
from softprompt.peft_format import export_peft
from softprompt.serve.bank import PromptBank, named_prompt_folders

from conftest import make_gpt2
from fake_hub import USER, FakeHub
from test_cli_train import NEG, POS, bert_dir, invoke, last_json, reviews  # noqa: F401 (fixtures)


def configure(monkeypatch, **env) -> None:
    """Set Hub environment variables as a user would before starting Python: huggingface_hub
    reads them into `huggingface_hub.constants` at import, so that module is read again."""
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    importlib.reload(constants)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub().start()
    configure(monkeypatch, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf-home"),
              HF_HUB_CACHE=str(tmp_path / "hub-cache"), HF_TOKEN="hf_test", HF_HUB_OFFLINE=None,
              TRANSFORMERS_OFFLINE=None, HF_HUB_DISABLE_PROGRESS_BARS="1")
    yield server
    server.stop()
    monkeypatch.undo()
    importlib.reload(constants)


def prompt_model(tokenizer, seed: int, base=None):
    """A tiny GPT-2 prompt-tuning model whose prompt values depend on `seed`."""
    base = base if base is not None else make_gpt2(tokenizer)
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(num_virtual_tokens=3), tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


def logits(model, text="a gem of a film"):
    with torch.no_grad():
        return model(**model.encode({"text": text})).logits


def downloads(server) -> list[str]:
    return [path for method, path in server.requests if method == "GET" and "/resolve/" in path]


# -- the source grammar --------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("user/sst2", HubLocation("user/sst2")),
    ("user/sst2@v1", HubLocation("user/sst2", "v1")),
    ("user/prompts:sst2", HubLocation("user/prompts", None, "sst2")),
    ("org.x/my_prompts@refs/pr/1:tasks/rte/", HubLocation("org.x/my_prompts", "refs/pr/1", "tasks/rte")),
    ("./user/sst2", None), ("/abs/user/sst2", None), ("~/sst2", None), ("runs/sst2/prompt", None),
    ("sst2", None), ("user/bad--name", None), ("user/-x", None), ("user/sst2@", None),
])
def test_hub_sources_are_parsed_and_local_paths_are_not(spec, expected):
    assert HubLocation.parse(spec) == expected
    if expected is not None:
        assert HubLocation.parse(str(expected)) == expected  # str() writes the same form back


def test_a_folder_outside_the_repository_is_refused():
    with pytest.raises(ConfigError, match="relative path inside the repository"):
        HubLocation.parse("user/sst2:../other")
    assert HubLocation.parse("sst2", bare_name=True) == HubLocation("sst2")  # a push under the token's user


# -- push and load back --------------------------------------------------------------------
def test_save_pretrained_pushes_and_from_pretrained_loads_the_same_prompt(hub, gpt2_tokenizer, tmp_path):
    model = prompt_model(gpt2_tokenizer, seed=1)
    url = model.save_pretrained(tmp_path / "sst2-prompt", push_to_hub=True, repo_id="tester/sst2")
    files = hub.files("tester/sst2")
    assert url == f"{hub.url}/tester/sst2/commit/{hub.repos['tester/sst2'].refs['main']}"
    local = {p.name: p.read_bytes() for p in (tmp_path / "sst2-prompt").iterdir()}
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == local  # the folder, byte for byte
    assert hub.repos["tester/sst2"].private  # private unless asked otherwise

    loaded = sp.SoftPromptModel.from_pretrained(model.base, "tester/sst2", tokenizer=gpt2_tokenizer)
    assert torch.equal(loaded.export(), model.export())
    assert torch.equal(logits(loaded), logits(model))

    # the default repository is the folder's name, under the token's user (as transformers does)
    model.save_pretrained(tmp_path / "my-prompt", push_to_hub=True)
    assert f"{USER}/my-prompt" in hub.repos


def test_revisions_and_folders_of_one_repository(hub, gpt2_tokenizer):
    first = prompt_model(gpt2_tokenizer, seed=1)
    base = first.base
    second, on_branch, other = (prompt_model(gpt2_tokenizer, seed=s, base=base) for s in (2, 3, 4))
    first.push_to_hub("tester/prompts:sst2")
    pinned = hub.repos["tester/prompts"].refs["main"]
    second.push_to_hub("tester/prompts:sst2")
    other.push_to_hub("tester/prompts:rte")
    on_branch.push_to_hub("tester/prompts@dev:sst2")

    def load(spec, **kwargs):
        return sp.SoftPromptModel.from_pretrained(base, spec, tokenizer=gpt2_tokenizer, **kwargs).export()

    assert torch.equal(load("tester/prompts:sst2"), second.export())  # main: the latest push
    assert torch.equal(load(f"tester/prompts@{pinned}:sst2"), first.export())  # a commit keeps its files
    assert torch.equal(load("tester/prompts:sst2", revision=pinned), first.export())
    assert torch.equal(load("tester/prompts@dev:sst2"), on_branch.export())
    assert torch.equal(load("tester/prompts:rte"), other.export())
    assert not torch.equal(first.export(), second.export())  # the checks above could not pass by accident

    for spec, message in [("tester/prompts:nope", "tester/prompts:nope.*no folder 'nope'"),
                          ("tester/prompts@v9:sst2", "tester/prompts@v9:sst2.*no revision 'v9'"),
                          ("tester/none", "tester/none.*no Hub repository 'tester/none'"),
                          ("tester/prompts", "tester/prompts: no prompt at that level .*the prompts rte, sst2: "
                                             "name one as tester/prompts:rte")]:
        with pytest.raises(PromptFileError, match=message):
            load(spec)
    with pytest.raises(ConfigError, match="names revision 'dev' but revision='main'"):
        load("tester/prompts@dev:sst2", revision="main")


def test_a_push_removes_the_prompt_files_the_new_folder_lacks(hub, gpt2_tokenizer):
    """Pushing a prompt without a task head over one with a head must not leave the old
    head and task.json beside the new prompt (a mixed folder would load the stale head)."""
    model = prompt_model(gpt2_tokenizer, seed=1)
    model.push_to_hub("tester/mixed", extra_json={"task.json": {"kind": "generation"}},
                      extra_tensors={"head.safetensors": {"w": torch.ones(2)}})
    assert {"task.json", "head.safetensors", "trainable.safetensors"} <= set(hub.files("tester/mixed"))
    model.push_to_hub("tester/mixed", save_trainable=False)
    assert sorted(hub.files("tester/mixed")) == [".gitattributes", "README.md", "prompt.safetensors",
                                                 "prompt_config.json"]


def test_a_local_folder_wins_and_a_path_object_is_always_local(hub, gpt2_tokenizer, tmp_path, monkeypatch):
    remote, local = prompt_model(gpt2_tokenizer, seed=1), prompt_model(gpt2_tokenizer, seed=2)
    remote.push_to_hub("tester/sst2")
    monkeypatch.chdir(tmp_path)
    local.save_pretrained("tester/sst2")  # a local folder that looks like a Hub id
    hub.requests.clear()
    loaded = sp.SoftPromptModel.from_pretrained(remote.base, "tester/sst2", tokenizer=gpt2_tokenizer)
    assert torch.equal(loaded.export(), local.export()) and hub.requests == []
    with pytest.raises(PromptFileError, match="no such prompt directory"):
        sp.SoftPromptModel.from_pretrained(remote.base, Path("tester/other"))
    assert hub.requests == []


# -- the cache, offline mode, partial downloads ------------------------------------------------
def test_the_cache_serves_later_loads_and_offline_mode(hub, gpt2_tokenizer, monkeypatch):
    model = prompt_model(gpt2_tokenizer, seed=1)
    model.push_to_hub("tester/sst2")
    model.push_to_hub("tester/sst2@dev")
    first = resolve_prompt_source("tester/sst2")
    assert downloads(hub)
    hub.requests.clear()
    assert resolve_prompt_source("tester/sst2") == first and downloads(hub) == []  # cached: nothing fetched again

    configure(monkeypatch, HF_HUB_OFFLINE="1")
    hub.requests.clear()
    loaded = sp.SoftPromptModel.from_pretrained(model.base, "tester/sst2", tokenizer=gpt2_tokenizer)
    assert torch.equal(loaded.export(), model.export()) and hub.requests == []  # not one request
    with pytest.raises(PromptFileError, match=r"tester/sst2@dev: .*not in the Hub cache.*HF_HUB_OFFLINE is set"):
        resolve_prompt_source("tester/sst2@dev")  # never downloaded
    assert hub.requests == []


def test_a_partial_download_never_loads(hub, gpt2_tokenizer, monkeypatch):
    model = prompt_model(gpt2_tokenizer, seed=1)
    model.push_to_hub("tester/sst2")
    hub.truncate.add("prompt.safetensors")  # its transfer breaks off halfway, every time
    with pytest.raises(PromptFileError, match="tester/sst2: download from the Hub failed"):
        sp.SoftPromptModel.from_pretrained(model.base, "tester/sst2")
    snapshots = list(Path(constants.HF_HUB_CACHE).glob("models--tester--sst2/snapshots/*"))
    assert len(snapshots) == 1 and (snapshots[0] / "prompt_config.json").exists()  # the other files arrived
    assert not (snapshots[0] / "prompt.safetensors").exists()

    configure(monkeypatch, HF_HUB_OFFLINE="1")  # the cache alone: its copy is known to be incomplete
    with pytest.raises(PromptFileError, match="tester/sst2: .*incomplete"):
        sp.SoftPromptModel.from_pretrained(model.base, "tester/sst2")

    configure(monkeypatch, HF_HUB_OFFLINE=None)
    hub.truncate.clear()
    loaded = sp.SoftPromptModel.from_pretrained(model.base, "tester/sst2")  # online again: completed
    assert torch.equal(loaded.export(), model.export())


def test_an_unreachable_hub_names_the_repository(hub, gpt2_tokenizer):
    model = prompt_model(gpt2_tokenizer, seed=1)
    hub.stop()
    with pytest.raises(PromptFileError, match=r"tester/gone: no such local folder, and it is not in the Hub cache "
                                              r".*cannot be reached"):
        sp.SoftPromptModel.from_pretrained(model.base, "tester/gone")


# -- pushes the Hub refuses -------------------------------------------------------------------
def test_pushes_without_a_token_or_a_prompt_are_refused(hub, gpt2_tokenizer, tmp_path, monkeypatch):
    model = prompt_model(gpt2_tokenizer, seed=1)
    model.save_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match="cannot push to tester/x: .*401.*HF_TOKEN"):
        push_prompt_folder(tmp_path / "p", "tester/x", token="hf_wrong")
    configure(monkeypatch, HF_TOKEN=None)
    with pytest.raises(ConfigError, match="cannot push to tester/x: .*HF_TOKEN"):
        model.push_to_hub("tester/x")
    with pytest.raises(ConfigError, match="not a Hub destination"):
        push_prompt_folder(tmp_path / "p", "a/b/c", token="hf_test")
    (tmp_path / "not-a-prompt").mkdir()
    with pytest.raises(PromptFileError, match="prompt_config.json: missing"):
        push_prompt_folder(tmp_path / "not-a-prompt", "tester/x", token="hf_test")
    assert hub.repos == {}  # nothing was created


# -- the command line and the serving bank ---------------------------------------------------------
@pytest.fixture
def trained_run(bert_dir, reviews, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "prompt-tuning", "--task", "classification",
               "--train", reviews, "--eval", reviews, "--field", "review:text", "--output", out, "-P", "2",
               "--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.batch_size=4",
               "--set", "train.progress=false")
    assert r.exit_code == 0, r.output
    return out


def test_cli_push_then_predict_eval_and_serve_by_hub_id(hub, trained_run, bert_dir, tmp_path):  # noqa: F811
    r = invoke("push", trained_run, "tester/cls", "--public", "-m", "first prompt")
    assert r.exit_code == 0, r.output
    assert "pushed prompt-tuning prompt" in r.output and f"{hub.url}/tester/cls/commit/" in r.output
    local = {p.name: p.read_bytes() for p in (trained_run / "prompt").iterdir()}
    assert {"task.json", "head.safetensors"} <= set(local)
    assert {k: v for k, v in hub.files("tester/cls").items() if k != ".gitattributes"} == local
    assert not hub.repos["tester/cls"].private

    texts = POS[:2] + NEG[:2]
    by_folder = invoke("predict", "--prompt", trained_run, "--model", bert_dir, *texts)
    by_hub = invoke("predict", "--prompt", "tester/cls", "--model", bert_dir, *texts)
    assert by_hub.exit_code == 0, by_hub.output
    assert by_hub.stdout == by_folder.stdout and len(by_hub.stdout.splitlines()) == 4

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "pos" if t in POS else "neg"}) + "\n" for t in texts))
    scores = [last_json(invoke("eval", "--prompt", p, "--data", data, "--model", bert_dir).stdout)
              for p in (trained_run, "tester/cls")]
    assert scores[0] == scores[1] and "accuracy" in scores[0]

    r = invoke("info", "tester/cls", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "prompt-tuning"

    # serve --prompt NAME=HUB_ID: resolved (fetched) before the model loads, then loaded by the bank
    named = named_prompt_folders(["cls=tester/cls"], None)
    assert {p.name: p.read_bytes() for p in named["cls"].iterdir() if p.name != ".gitattributes"} == local
    base, tokenizer = load_base(str(bert_dir))
    bank = PromptBank(base, tokenizer)
    from_folder = bank.add("from-folder", trained_run)
    for name, source in (("from-hub", named["cls"]), ("by-id", "tester/cls")):  # PromptBank.add takes the id too
        entry = bank.add(name, source)
        assert torch.equal(entry.tensor, from_folder.tensor) and entry.task is not None
    r = invoke("serve", "--model", tmp_path / "no-model", "--prompt", "cls=tester/missing")
    assert r.exit_code == 1 and "tester/missing" in r.output and "no-model" not in r.output, r.output

    r = invoke("push", tmp_path, "tester/cls")
    assert r.exit_code == 1 and "prompt_config.json: missing" in r.output


def test_offline_mode_is_read_from_the_environment_at_start(hub, gpt2_tokenizer, tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1 loads a cached prompt without a request, and
    names the repository of one it does not have."""
    model = prompt_model(gpt2_tokenizer, seed=1)
    model.push_to_hub("tester/sst2")
    resolve_prompt_source("tester/sst2")  # into the cache
    hub.requests.clear()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-m", "softprompt.cli", "info", "--json"]
    done = subprocess.run([*run, "tester/sst2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensor_shape"] == list(model.export().shape)
    done = subprocess.run([*run, "tester/other"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("error: tester/other: ") and "HF_HUB_OFFLINE" in done.stderr
    assert hub.requests == []


# -- the base model's Hub id ----------------------------------------------------------------------
def test_aliases_resolve_to_their_upstream_hub_id(tmp_path):
    assert hub_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("bert-tiny-mlm") is None  # its package names no upstream
    assert hub_id("gpt2") == "gpt2" and hub_id("user/model") == "user/model"
    assert hub_id(str(tmp_path)) is None and hub_id("./model") is None and hub_id(None) is None


@pytest.mark.parametrize("recorded, expected", [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
    ("user/base", "user/base"),
    ("/models/local-copy", None),
])
def test_model_cards_and_peft_adapters_record_the_hub_id(gpt2_tokenizer, tmp_path, recorded, expected):
    model = prompt_model(gpt2_tokenizer, seed=1)
    model.base.config._name_or_path = recorded  # what load_base records: the alias, or the path / id
    model.save_pretrained(tmp_path / "p", metadata={"model": recorded})
    card = ModelCard.load(tmp_path / "p" / "README.md")
    assert card.data.base_model == expected
    assert f"prompt for {expected or recorded}" in card.text
    if recorded in ("smollm2-135m", "minilm"):
        assert f"softprompt's packaged model `{recorded}`" in card.text
    export_peft(model, tmp_path / "peft")
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == (expected or recorded)
