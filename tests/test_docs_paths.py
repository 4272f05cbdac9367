"""The docs reference only what the repository holds: every relative link, every file path
(``src/...``, ``docs/...``, ``tests/...``, ``bench/...``, ``examples/...``, ``scripts/...``;
a ``path::test_name`` names a test that is in that file; a glob matches at least one file)
every ``python -m`` module of this repository, and every module of a package layout block
(a fenced block that starts with ``src/softprompt/``) named in README.md and docs/**/*.md exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
TOP = ("src", "docs", "tests", "bench", "examples", "scripts")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./*<>{{}}-]*)(?:::(\w+))?")
LAYOUT = re.compile(r"^```\n(src/softprompt/\n.*?)^```", re.M | re.S)
MODULE = re.compile(r"python -m ([\w.]*\w)(?![.<\w])")  # not a placeholder: bench.<group>.<name>


def references(text: str) -> list[tuple[str, str]]:
    """(kind, reference) of every link target, repository path, ``python -m`` module and
    layout module in Markdown `text`: kind ``link`` (relative to the page), ``path``
    (relative to the repository; ``path::test``), ``module``, ``layout`` (a file name
    somewhere under src/softprompt/)."""
    found = []
    for target in LINK.findall(text):
        if not re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # not a URL, not an anchor on the page
            found.append(("link", target.split("#")[0]))
    for path, test in PATH.findall(text):
        path = path.rstrip(".,:;")
        found.append(("path", f"{path}::{test}" if test else path))
    found += [("module", m) for m in MODULE.findall(text)]
    for block in LAYOUT.findall(text):
        found += [("layout", name) for name in re.findall(r"(?<![\w/.])(\w+\.py)\b", block)]
    return found


def missing(page: Path, text: str) -> list[str]:
    """The references of `page` that name nothing in the repository."""
    out = []
    for kind, ref in references(text):
        if kind == "link":
            if not (page.parent / ref).exists():
                out.append(f"link {ref}")
        elif kind == "path":
            path, _, test = ref.partition("::")
            if re.search(r"[<{]", path):  # a placeholder such as docs/cli/<command>.md
                continue
            if "*" in path:
                if not list(REPO.glob(path)):
                    out.append(f"path {path} (matches no file)")
            elif not (REPO / path).exists():
                out.append(f"path {path}")
            elif test and not re.search(rf"^\s*(?:async )?def {test}\(", (REPO / path).read_text(), re.M):
                out.append(f"test {ref}")
        elif kind == "layout":
            if not list((REPO / "src" / "softprompt").rglob(ref)):
                out.append(f"layout {ref}")
        else:
            top, *rest = ref.split(".")
            if top not in ("softprompt", "bench", "scripts", "tests"):
                continue  # another package's module (pytest, torch.distributed.run, ...)
            where = (REPO / "src" if top == "softprompt" else REPO) / top / Path(*rest)
            if not (where.with_suffix(".py").is_file() or (where / "__main__.py").is_file()):
                out.append(f"module {ref}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_link_and_module_a_page_names_exists(page):
    assert missing(page, page.read_text(encoding="utf-8")) == []


def test_the_scan_finds_what_is_not_there():
    text = """See [the results](RESULTS.md), [a gone page](GONE.md), [hub](https://example.com) and
    [a section](#set-up). Code: `src/softprompt/inject.py`, `src/softprompt/train.py`; runs in
    `tests/test_layout.py::test_no_import_loop_between_modules` and
    `tests/test_layout.py::test_that_never_was`; reports `bench/results/*.json` and
    `bench/results/nothing_*.csv`; pages `docs/cli/<command>.md`. Rerun:
    `python -m bench.render.results`, `python -m bench.render.nothing`, `python -m pytest`,
    `python -m bench.<group>.<name>`.

```
src/softprompt/
  inject.py       the one place
  serve/          bank.py, nothing.py
```
"""
    assert missing(REPO / "docs" / "page.md", text) == [
        "link GONE.md", "path src/softprompt/train.py", "test tests/test_layout.py::test_that_never_was",
        "path bench/results/nothing_*.csv (matches no file)", "module bench.render.nothing", "layout nothing.py"]
