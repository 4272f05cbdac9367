"""Prompt folders at fsspec URLs (`io.remote`, issue 22 item 2), on fsspec's in-memory file
system and its local one (``file://``): loaded as local folders load (same prompts, same
answers, the base model's fingerprint checked), registered without being read and read on
the first request, copied into the cache once and again only when the source changed, and
never loaded from a copy that broke off."""

from __future__ import annotations

import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

import softprompt as sp
from softprompt.errors import BaseModelMismatchError, ConfigError, PromptFileError
from softprompt.folder import save_with_task
from softprompt.io.remote import fetch_folder, remote_cache
from softprompt.serve import Engine, PromptBank, Request, create_app
from softprompt.tasks import SequenceClassification

from serving import Server

TEXTS = ["a gem of a film", "bad"]


@pytest.fixture
def store(family_models, tmp_path, monkeypatch):
    """Two prompt folders (a deep prompt with a classifier head, an input prompt) saved
    locally and uploaded under a fresh ``memory://`` root; the cache in tmp_path."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    base, tok = family_models("llama")
    local = tmp_path / "prompts"
    torch.manual_seed(0)
    deep = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4, template="{text}", init_std=0.5),
                              tokenizer=tok).eval()
    task = SequenceClassification(["neg", "pos"], pool="last")
    task.bind(deep)
    save_with_task(deep, task, local / "sentiment", {})
    torch.manual_seed(1)
    sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:3] {text}", init="vocab"),
                       tokenizer=tok).save_pretrained(local / "free")
    url = f"memory://store-{uuid.uuid4().hex}/prompts"
    fs = fsspec.filesystem("memory")
    for name in ("sentiment", "free"):
        fs.put(str(local / name), f"{url}/{name}", recursive=True)
    return base, tok, local, url


def requests():
    return [Request("sentiment", TEXTS[0]), Request("free", TEXTS[1], generate=True, options={"max_new_tokens": 3}),
            Request("sentiment", TEXTS[1])]


def answers(bank):
    results = Engine(bank).run(requests())
    assert all(r.ok for r in results), [r.error for r in results]
    return [r.output for r in results]


def test_a_url_loads_as_the_local_folder_does(store):
    base, tok, local, url = store
    remote = sp.SoftPromptModel.from_pretrained(base, f"{url}/free", tokenizer=tok)
    there = sp.SoftPromptModel.from_pretrained(base, local / "free", tokenizer=tok)
    assert torch.equal(remote.export(), there.export())
    assert answers(PromptBank.from_directory(base, tok, url)) == answers(PromptBank.from_directory(base, tok, local))


def test_registered_urls_are_read_on_first_request(store):
    base, tok, local, url = store
    bank = PromptBank.from_directory(base, tok, url, lazy=True)
    assert bank.names() == ["free", "sentiment"] and bank.reads == 0 and bank.loaded() == []
    # /v1/models' description from the two JSON files, no tensors read
    assert bank.describe("sentiment")["task"] == "classification" and bank.describe("free")["kind"] == "input"
    assert bank.reads == 0
    assert answers(bank) == answers(PromptBank.from_directory(base, tok, local))
    assert bank.reads == 2


def test_the_cache_copies_a_source_once_and_again_when_it_changed(store, monkeypatch):
    base, tok, local, url = store
    first = fetch_folder(f"{url}/free")
    gets = []
    original = MemoryFileSystem.get_file
    monkeypatch.setattr(MemoryFileSystem, "get_file", lambda self, *a, **k: gets.append(a[0]) or original(self, *a, **k))
    assert fetch_folder(f"{url}/free") == first and gets == []  # unchanged: read from the cache
    torch.manual_seed(7)  # another prompt at the same URL
    changed = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:3] {text}", init="random"), tokenizer=tok)
    changed.save_pretrained(local / "changed")
    fs = fsspec.filesystem("memory")
    for f in (local / "changed").iterdir():  # each file written over the one at the source
        fs.put_file(str(f), f"{url}/free/{f.name}")
    second = fetch_folder(f"{url}/free")
    assert second != first and gets
    loaded = sp.SoftPromptModel.from_pretrained(base, f"{url}/free", tokenizer=tok)
    assert torch.equal(loaded.export(), changed.export())


@pytest.mark.parametrize("fault", ["short", "broken"])
def test_a_copy_that_broke_off_never_loads(store, monkeypatch, fault):
    """A file that arrives short of its listed size, or a transfer that raises midway:
    refused, and nothing is left in the cache that a later load could take."""
    base, tok, _, url = store
    original = MemoryFileSystem.get_file

    def get_file(self, rpath, lpath, **kwargs):
        original(self, rpath, lpath, **kwargs)
        if rpath.endswith(".safetensors"):
            if fault == "broken":
                raise ConnectionResetError("connection reset by peer")
            with open(lpath, "r+b") as f:
                f.truncate(10)

    monkeypatch.setattr(MemoryFileSystem, "get_file", get_file)
    with pytest.raises(PromptFileError, match="bytes arrived" if fault == "short" else "the copy failed"):
        fetch_folder(f"{url}/sentiment")
    assert not any(p.name == ".complete" for p in remote_cache().rglob("*"))
    with pytest.raises(PromptFileError):
        sp.SoftPromptModel.from_pretrained(base, f"{url}/sentiment", tokenizer=tok)
    monkeypatch.setattr(MemoryFileSystem, "get_file", original)
    assert sp.SoftPromptModel.from_pretrained(base, f"{url}/sentiment", tokenizer=tok) is not None


def test_the_base_model_fingerprint_is_checked_for_urls(store):
    base, tok, _, url = store
    torch.manual_seed(123)
    other = type(base)(base.config).eval()  # the same shape, other weights
    with pytest.raises(BaseModelMismatchError):
        sp.SoftPromptModel.from_pretrained(other, f"{url}/free", tokenizer=tok)


def test_what_is_not_a_prompt_folder_is_named(store):
    base, tok, _, url = store
    with pytest.raises(PromptFileError, match=r"no prompt_config\.json there"):
        sp.SoftPromptModel.from_pretrained(base, f"{url}/nothing", tokenizer=tok)
    with pytest.raises(PromptFileError, match="it holds the prompts free, sentiment"):
        fetch_folder(url)
    with pytest.raises(ConfigError, match="no file system for this URL"):
        fetch_folder("nosuchscheme://x/y")
    with pytest.raises(ConfigError, match="does not exist"):
        PromptBank.from_directory(base, tok, url + "-missing")


def test_file_urls_and_named_urls_serve(store, tmp_path):
    """``file://`` (fsspec's local file system) as --prompts, and ``--prompt NAME=URL``."""
    from softprompt.serve.bank import named_prompt_folders

    base, tok, local, url = store
    bank = PromptBank.from_directory(base, tok, f"file://{local}", lazy=True)
    assert answers(bank) == answers(PromptBank.from_directory(base, tok, local))
    named = named_prompt_folders([f"free={url}/free"], None)
    assert named == {"free": f"{url}/free"}
    with pytest.raises(ConfigError, match="--prompt 'bad=memory://"):
        named_prompt_folders([f"bad={url}/nothing"], None)


def test_admin_loads_from_under_a_url_root_only(store):
    import httpx

    base, tok, _, url = store
    bank = PromptBank.from_directory(base, tok, url, lazy=True)
    with Server(create_app(bank, admin=True, prompt_root=url)) as server, httpx.Client(base_url=server.url) as client:
        r = client.put("/v1/prompts/again", json={"path": f"{url}/free"})
        assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
        for outside in (f"{url}-other/free", f"{url}/../x", "/tmp"):
            r = client.put("/v1/prompts/x", json={"path": outside})
            assert r.status_code == 403 and r.json()["error"]["param"] == "path", (outside, r.text)
    assert "again" in bank.names() and "x" not in bank.names()
    assert torch.equal(bank["again"].tensor, bank["free"].tensor)
