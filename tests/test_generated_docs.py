"""The generated reference pages (scripts/gen_docs.py): docs/CONFIG.md and docs/cli/*.md are
what the code says today, every key and command has its entry, and the check that guards
them notices a page that is changed, missing or left over."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def test_the_committed_pages_are_what_the_code_generates():
    stale = gen.stale()
    assert not stale, f"out of date: {[str(p) for p in stale]}; run: python scripts/gen_docs.py"


def test_every_config_key_has_a_row_with_its_help_and_default():
    from softprompt.training.config import RunConfig, TrainConfig, apply

    page = (REPO / gen.CONFIG_PAGE).read_text(encoding="utf-8")
    assert gen.UNDOCUMENTED not in page, "a key has no entry in its class docstring's Attributes / Args"
    sections = {"train", "prompt", "task_options"}
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in sections]
    keys += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    for key in keys:
        assert f"| `{key}` |" in page, key
    for name, *_ in gen._dataclass_rows(RunConfig, "", tuple(sections)) + gen._dataclass_rows(TrainConfig, "train."):
        apply(RunConfig(), name, None, source="test")  # every documented key is one `--set` takes


def test_every_task_option_in_the_reference_is_one_a_run_accepts():
    from softprompt.tasks import TASKS

    page = (REPO / gen.CONFIG_PAGE).read_text(encoding="utf-8")
    for cls in TASKS.values():
        for name, *_ in gen.task_options(cls):
            assert f"| `task.{name}` |" in page


def test_every_command_has_a_page_and_the_index_links_it():
    from softprompt.cli import app

    commands = {n for n, c in typer.main.get_command(app).commands.items() if not c.hidden}
    pages = {p.stem for p in (REPO / gen.CLI_DIR).glob("*.md")} - {"README"}
    assert pages == commands
    index = (REPO / gen.CLI_DIR / "README.md").read_text(encoding="utf-8")
    for name in commands:
        assert f"]({name}.md)" in index
        page = (REPO / gen.CLI_DIR / f"{name}.md").read_text(encoding="utf-8")
        assert f"Usage: softprompt {name}" in page


def test_the_check_notices_an_edited_a_missing_and_a_left_over_page(tmp_path):
    for path, text in gen.pages().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text, encoding="utf-8")
    assert gen.stale(tmp_path) == []
    config = tmp_path / gen.CONFIG_PAGE
    config.write_text(config.read_text().replace("| `train.lr` |", "| `train.learning_rate` |"))
    (tmp_path / gen.CLI_DIR / "eval.md").unlink()
    (tmp_path / gen.CLI_DIR / "gone.md").write_text("# a command that was removed\n")
    assert sorted(map(str, gen.stale(tmp_path))) == sorted(
        map(str, [gen.CONFIG_PAGE, gen.CLI_DIR / "eval.md", gen.CLI_DIR / "gone.md"]))
    gen.write(tmp_path)
    assert gen.stale(tmp_path) == [] and not (tmp_path / gen.CLI_DIR / "gone.md").exists()


def test_docstring_entries_shared_inline_and_inherited():
    class Parent:
        """Settings.

        Attributes:
            a / b: the first two,
                over two lines.
            lr: of the prompt; head_lr: of the head.

        Raises:
            c: not an attribute.
        """

    class Child(Parent):
        """A child that documents nothing."""

    entries = gen.doc_entries(Child, "Attributes")
    assert entries["a"] == entries["b"] == "the first two, over two lines."
    assert entries["lr"] == entries["head_lr"] == "of the prompt; head_lr: of the head."
    assert "c" not in entries
