"""The package's structure, as the architecture promises it (README, Layout).

- the server loads prompts without anything of training (`softprompt.training`);
- no import loop between the package's modules, counting imports inside functions;
- each file name of a saved prompt folder is written once in the source (`io/prompt.py`).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "softprompt"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (functions included);
    a package importing its own submodules is left out (that runs them, it is not a loop)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for candidate in [target] + [f"{target}.{a.name}" for a in node.names]:
                if candidate in modules:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return {m for m in found if m != name and not m.startswith(name + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_between_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["softprompt.data.readers"] >= {"softprompt.data.hf", "softprompt.errors"}  # the walk sees imports
    assert _cycles(graph) == []


def test_the_loop_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("entry", ["softprompt.serve", "softprompt.serve.app", "softprompt.folder"])
def test_serving_imports_nothing_of_training(entry):
    code = (f"import sys, json, {entry}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('softprompt'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert entry in loaded and "softprompt.model" in loaded
    assert [m for m in loaded if m.startswith("softprompt.training")] == []


@pytest.mark.parametrize("name", ["prompt_config.json", "prompt.safetensors", "trainable.safetensors",
                                  "task.json", "head.safetensors"])
def test_each_folder_file_name_is_written_once(name):
    quoted = re.compile(r"""["']""" + re.escape(name) + r"""["']""")
    places = [f"{path.relative_to(SRC)}:{i}" for path in PACKAGE.rglob("*.py")
              for i, line in enumerate(path.read_text().splitlines(), 1) if quoted.search(line)]
    assert len(places) == 1 and places[0].startswith("softprompt/io/prompt.py"), places
