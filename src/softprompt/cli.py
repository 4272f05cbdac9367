"""The ``softprompt`` command line.

A thin layer over the library: every command parses its options, calls one library
function and prints the result. Library errors (`SoftPromptError`) are the user's to fix,
so they print as one ``error: ...`` line on stderr with exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Callable

import typer

from .errors import PromptFileError, SoftPromptError

app = typer.Typer(
    name="softprompt",
    help="Soft-prompt tuning on frozen transformers: inspect saved prompts and the packaged models.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback is only shown for real bugs; keep it plain (rich's boxes hide the frames in CI logs).
    pretty_exceptions_enable=False,
)


def _reports_errors(command: Callable) -> Callable:
    """Turn a `SoftPromptError` into ``error: <message>`` on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SoftPromptError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None

    return wrapper


# -- info ---------------------------------------------------------------------------------
def _tensor_header(path: Path) -> dict[str, list[int]]:
    """Names and shapes of the tensors in a safetensors file, read from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PromptFileError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def prompt_info(directory: Path) -> dict[str, Any]:
    """What `softprompt info` reports about a saved prompt directory.

    Args:
        directory: a folder written by `SoftPromptModel.save_pretrained`.

    Returns:
        A JSON-serialisable dict: method, kind, template, num_virtual_tokens, the stored
        tensor's shape and parameter count, whether trainable state is present (and its
        parameter count), the size on disk in bytes, the base model's identity, metadata.

    Raises:
        PromptFileError: not a prompt directory, or its files are unreadable.
    """
    from . import io

    directory = Path(directory)
    data = io.read_config(directory)
    tensors = _tensor_header(directory / io.PROMPT_FILE)
    if "prompt" not in tensors:
        raise PromptFileError(f"{directory / io.PROMPT_FILE}: has no tensor 'prompt'")
    shape = tensors["prompt"]
    trainable_path = directory / io.TRAINABLE_FILE
    trainable = None
    if trainable_path.is_file():
        trainable = sum(math.prod(s) for s in _tensor_header(trainable_path).values())
    base = data["base_model"]
    return {
        "path": str(directory),
        "method": data["method"],
        "kind": data.get("kind", "deep" if len(shape) == 5 else "input"),
        "template": data.get("template"),
        "num_virtual_tokens": data.get("num_virtual_tokens"),
        "tensor_shape": shape,
        "parameters": math.prod(shape),
        "trainable_state": trainable is not None,
        "trainable_parameters": trainable,
        "size_bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
        "base_model": {
            "model_type": base.get("model_type"),
            "name_or_path": base.get("name_or_path"),
            "architecture": base.get("architecture"),
            "num_layers": base.get("num_layers"),
            "hidden_size": base.get("hidden_size"),
            "num_key_value_heads": base.get("num_key_value_heads"),
            "head_dim": base.get("head_dim"),
            "vocab_size": base.get("vocab_size"),
            "embedding_fingerprint": base.get("embedding_fingerprint"),
        },
        "metadata": data.get("metadata") or {},
    }


def _format_info(info: dict[str, Any]) -> str:
    base = info["base_model"]
    trainable = (
        f"yes ({info['trainable_parameters']:,} parameters)" if info["trainable_state"] else "no (collapsed tensor only)"
    )
    rows = [
        ("path", info["path"]),
        ("method", info["method"]),
        ("kind", info["kind"]),
        ("template", info["template"]),
        ("num_virtual_tokens", info["num_virtual_tokens"]),
        ("tensor shape", "[" + ", ".join(str(d) for d in info["tensor_shape"]) + "]"),
        ("parameters", f"{info['parameters']:,}"),
        ("trainable state", trainable),
        ("size on disk", f"{info['size_bytes']} bytes"),
        ("base model", f"{base['model_type']} ({base['name_or_path'] or 'unnamed'})"),
        ("  architecture", base["architecture"]),
        ("  layers", base["num_layers"]),
        ("  hidden size", base["hidden_size"]),
    ]
    rows += [(f"metadata.{k}", json.dumps(v)) for k, v in info["metadata"].items()]
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in rows)


@app.command()
@_reports_errors
def info(
    directory: Path = typer.Argument(..., help="A prompt directory written by save_pretrained."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Describe a saved prompt: method, template, base model, tensor shape, size on disk."""
    result = prompt_info(directory)
    typer.echo(json.dumps(result) if as_json else _format_info(result))


# -- models -------------------------------------------------------------------------------
@app.command()
@_reports_errors
def models(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """List the packaged offline models (aliases for load_base) and whether each is installed."""
    from .models import ALIASES, missing_packages

    rows = []
    for alias, description in ALIASES.items():
        missing = missing_packages(alias)
        rows.append({"alias": alias, "installed": not missing, "missing": missing, "description": description})
    if as_json:
        typer.echo(json.dumps({"models": rows}))
        return
    width = max(len(r["alias"]) for r in rows)
    for r in rows:
        status = "installed" if r["installed"] else "missing: " + ", ".join(r["missing"])
        typer.echo(f"{r['alias']:<{width}}  {status:<12}  {r['description']}")


def main() -> None:  # pragma: no cover - `python -m softprompt.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
