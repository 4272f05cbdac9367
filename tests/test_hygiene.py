"""What a user of a package expects before any feature: a license, type information, the
version and environment at hand, and files others can read."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import stat
from pathlib import Path

import pytest

import softprompt as sp
from softprompt.cli import app

from conftest import make_gpt2
from test_cli_train import bert_dir, invoke, reviews  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def test_the_license_pyproject_names_ships_and_the_package_is_typed():
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    assert (importlib.resources.files("softprompt") / "py.typed").is_file()  # PEP 561: mypy reads our hints


def test_version_and_env():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"softprompt {importlib.metadata.version('softprompt')}"
    assert sp.__version__ == importlib.metadata.version("softprompt")
    r = invoke("env")
    assert r.exit_code == 0, r.output
    import torch
    import transformers

    lines = dict(line.split(": ", 1) for line in r.output.strip().splitlines())
    assert lines["torch"] == torch.__version__ and lines["transformers"] == transformers.__version__
    assert lines["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    # each extra named with what it needs, installed or not
    assert lines["extra test"].startswith("installed") and "pytest" in lines["extra test"]
    assert app.info.name == "softprompt"


@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_saved_folders_follow_the_umask(gpt2_tokenizer, tmp_path, umask, dirs, files):
    """A prompt folder is written in a private temporary folder and renamed into place:
    it ends with the modes the user's umask gives (a server running as another user of
    the group reads it), not the temporary folder's 0700."""
    model = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), sp.PromptTuningConfig(template="[P:2] {text}"),
                               tokenizer=gpt2_tokenizer)
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "prompt")
    finally:
        os.umask(old)
    path = tmp_path / "prompt"
    assert stat.S_IMODE(path.stat().st_mode) == dirs
    written = [p for p in path.rglob("*")]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == (dirs if p.is_dir() else files) for p in written)


def test_the_public_api_exports_what_users_call_and_imports_it_on_first_use():
    import subprocess
    import sys

    for name in sp.__all__:
        assert getattr(sp, name) is not None, name
    for name in ("load_base", "train", "PromptBank", "Engine"):
        assert name in sp.__all__
    loaded = subprocess.run([sys.executable, "-c", "import softprompt, sys; print(sorted(m for m in sys.modules "
                             "if m.startswith(('softprompt.serve', 'softprompt.training', 'fastapi'))))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"  # `import softprompt` loads neither the server nor the training wing
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        sp.Engin  # noqa: B018


def test_the_extras_map_is_pyproject_s():
    """`softprompt.extras.EXTRAS` (what `env` reports and the errors name) and pyproject's
    optional dependencies list the same packages; `all` installs every extra but the GPU-only ones."""
    import re

    from softprompt.extras import EXTRAS, GPU_ONLY

    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    declared = {k: v for k, v in ((m.group(1), [re.split(r"[<>=\[]", d)[0] for d in re.findall(r'"([^"]+)"', m.group(2))])
                                  for m in re.finditer(r"^(\w+) = \[(.*)\]$", section, re.M))}
    assert declared.pop("all") == ["softprompt"] and "[" + ",".join(e for e in EXTRAS if e not in GPU_ONLY) + "]" in section
    assert declared == {extra: [dist for dist, _ in packages] for extra, packages in EXTRAS.items()}
    core = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert not any(f'"{dist}' in core for packages in EXTRAS.values() for dist, _ in packages)  # lean core


def test_a_missing_extra_is_named(monkeypatch, tmp_path, bert_dir, reviews, caplog):
    """Without an extra's package, the feature that needs it says which extra to install;
    a training run without matplotlib completes and only its plot is missing."""
    import sys

    from softprompt.data.hf import hf_records
    from softprompt.extras import MissingExtraError
    from softprompt.tasks import TokenClassification

    for module in ("seqeval", "seqeval.metrics", "datasets", "fastapi", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of it fails, as when not installed
    with pytest.raises(MissingExtraError, match=r"NER metrics .* pip install 'softprompt\[ner\]'"):
        TokenClassification(["O", "B-PER"]).metrics([["O"]], [["O"]])
    with pytest.raises(MissingExtraError, match=r"pip install 'softprompt\[hf\]'"):
        hf_records("hf:glue/sst2", "train")
    r = invoke("serve", "--model", bert_dir, "--prompts", tmp_path)
    assert r.exit_code == 1 and "softprompt serve needs the 'fastapi' package: pip install 'softprompt[serve]'" in r.output
    result = sp.train(model=str(bert_dir), task="classification", train_file=str(reviews), eval_file=str(reviews),
                      fields=["review:text"],
                      output=str(tmp_path / "run"), num_virtual_tokens=2,
                      train={"steps": 2, "batch_size": 4, "progress": False})
    assert result.steps == 2 and (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "curves.png").exists()
    assert any("curves.png not drawn" in r.message and "softprompt[plots]" in r.message for r in caplog.records)


def test_the_command_line_starts_without_torch():
    """`softprompt --help` loads neither torch nor transformers (4.3 s on 2 cores when the
    package imported them up front): every command imports what it calls in its body."""
    import subprocess
    import sys

    code = ("import sys, softprompt.cli; print(sorted(m for m in ('torch', 'transformers', 'accelerate') "
            "if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    r = subprocess.run([sys.executable, "-m", "softprompt.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "serve" in r.stdout and "env" in r.stdout
