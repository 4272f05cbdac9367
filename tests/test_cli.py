"""The ``softprompt`` command line: ``info`` on saved prompts, ``models``, errors, ``--help``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import softprompt as sp
from softprompt.cli import app
from softprompt.base_models import ALIASES

from conftest import make_gpt2

runner = CliRunner()


def files_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


@pytest.fixture
def saved(tmp_path, gpt2_tokenizer):
    """``save(config, **save_kwargs) -> (directory, model)``: a prompt saved from a tiny GPT-2."""

    def save(config, name="prompt", **kwargs):
        model = sp.SoftPromptModel(make_gpt2(gpt2_tokenizer), config, tokenizer=gpt2_tokenizer)
        directory = tmp_path / name
        model.save_pretrained(directory, **kwargs)
        return directory, model

    return save


def fields(output: str) -> dict[str, str]:
    """``name: value`` lines of the text output, by name."""
    out = {}
    for line in output.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def test_info_text_deep_prompt(saved):
    directory, model = saved(sp.PTuningV2Config(num_virtual_tokens=5))
    result = runner.invoke(app, ["info", str(directory)])
    assert result.exit_code == 0, result.output
    info = fields(result.stdout)
    shape = list(model.export().shape)
    assert shape == [2, 2, 4, 5, 8]  # (L, 2, H_kv, P, D_head) of the tiny GPT-2
    assert info["method"] == "p-tuning-v2"
    assert info["kind"] == "deep"
    assert info["template"] == "{text}"
    assert info["num_virtual_tokens"] == "5"
    assert info["tensor shape"] == "[2, 2, 4, 5, 8]"
    assert info["parameters"] == f"{math.prod(shape):,}"
    assert info["trainable state"].startswith("yes")
    assert info["size on disk"] == f"{files_size(directory)} bytes"
    assert info["base model"].startswith("gpt2")
    assert info["layers"] == "2" and info["hidden size"] == "32"


def test_info_json_input_prompt(saved):
    directory, model = saved(sp.PromptTuningConfig(num_virtual_tokens=4), metadata={"task": "sst2"})
    result = runner.invoke(app, ["info", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # exactly one JSON object
    assert info["method"] == "prompt-tuning"
    assert info["kind"] == "input"
    assert info["template"] == model.template.source
    assert info["num_virtual_tokens"] == 4
    assert info["tensor_shape"] == [4, 32] == list(model.export().shape)
    assert info["parameters"] == 4 * 32
    assert info["trainable_state"] is True
    assert info["trainable_parameters"] == model.trainable_parameters()
    assert info["size_bytes"] == files_size(directory)
    assert info["base_model"]["model_type"] == "gpt2"
    assert info["base_model"]["num_layers"] == 2
    assert info["base_model"]["hidden_size"] == 32
    assert info["base_model"]["embedding_fingerprint"] == model.identity.embedding_fingerprint
    assert info["metadata"] == {"task": "sst2"}


def test_info_without_trainable_state(saved):
    directory, _ = saved(sp.PTuningConfig(num_virtual_tokens=3, encoder="mlp"), save_trainable=False)
    result = runner.invoke(app, ["info", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["method"] == "p-tuning"
    assert info["trainable_state"] is False and info["trainable_parameters"] is None
    assert info["size_bytes"] == files_size(directory)
    text = runner.invoke(app, ["info", str(directory)])
    assert fields(text.stdout)["trainable state"].startswith("no")


def test_info_missing_directory(tmp_path):
    missing = tmp_path / "no-such-prompt"
    result = runner.invoke(app, ["info", str(missing)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(missing) in lines[0]
    assert "Traceback" not in result.output


def test_info_corrupt_config(saved):
    directory, _ = saved(sp.PromptTuningConfig(num_virtual_tokens=2))
    (directory / "prompt_config.json").write_text('{"format": "softprompt",\n  oops}')
    result = runner.invoke(app, ["info", str(directory)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "prompt_config.json" in result.stderr
    assert "line 2" in result.stderr


def test_info_corrupt_tensor_file(saved):
    directory, _ = saved(sp.PromptTuningConfig(num_virtual_tokens=2))
    (directory / "prompt.safetensors").write_bytes(b"\x00\x01")
    result = runner.invoke(app, ["info", str(directory)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "prompt.safetensors" in result.stderr


def test_models_lists_aliases():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for alias in ALIASES:
        assert alias in result.stdout
    listing = json.loads(runner.invoke(app, ["models", "--json"]).stdout)["models"]
    assert [m["alias"] for m in listing] == list(ALIASES)
    # The offline packages are installed wherever these tests run (see the README's set-up).
    assert all(m["installed"] and m["missing"] == [] for m in listing)


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"], ["models", "--help"]])
def test_help(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "Usage" in result.stdout


def test_console_script_help():
    """The installed entry point (`softprompt = softprompt.cli:app`) runs."""
    script = shutil.which("softprompt")
    command = [script] if script else [sys.executable, "-m", "softprompt.cli"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "info" in done.stdout and "models" in done.stdout
