"""Recipes speak of named labels: SST-2's files hold 0 / 1, its examples, predictions and
saved tasks say negative / positive; a prompt saved before the names (labels "0" / "1")
still evaluates on the recipe's data."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.data import RECIPES, load_recipe, resolve_data_root

from conftest import make_bert

ROOT = resolve_data_root()
needs_data = pytest.mark.skipif(not (ROOT / "sst2" / "dev.tsv").is_file(), reason=f"no SST-2 data under {ROOT}")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_no_classification_recipe_names_its_labels_by_number():
    for recipe in RECIPES.values():
        if recipe.task == "classification":
            assert not any(label.isdigit() for label in recipe.labels), recipe.name
            assert set(recipe.label_words) == set(recipe.labels), recipe.name
            assert set((recipe.label_names or {}).values()) <= set(recipe.labels), recipe.name


@needs_data
def test_sst2_examples_carry_the_names_of_the_files_ids():
    recipe = load_recipe("sst2")
    with open(ROOT / "sst2" / "dev.tsv", encoding="utf-8", newline="") as f:
        ids = [row["label"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    named = recipe.examples("dev")
    assert [e["label"] for e in named] == [{"0": "negative", "1": "positive"}[i] for i in ids]
    assert [e["label"] for e in recipe.examples("dev", file_labels=True)] == ids
    assert named.lines == recipe.examples("dev", file_labels=True).lines  # row checks still name the line
    assert recipe.uses_file_labels(["0", "1"]) and not recipe.uses_file_labels(["negative", "positive"])
    assert not load_recipe("rte").uses_file_labels(["entailment", "not_entailment"])


@needs_data
def test_a_trained_sst2_prompt_predicts_names_and_an_old_one_still_evaluates(wordpiece_tokenizer, tmp_path):
    model = tmp_path / "tiny-bert"
    make_bert(wordpiece_tokenizer).bert.save_pretrained(model)
    wordpiece_tokenizer.save_pretrained(model)
    out = tmp_path / "run"
    r = invoke("train", "--model", model, "--method", "p-tuning-v2", "--task", "sst2", "--output", out, "-P", "2",
               "--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "train.batch_size=4",
               "--set", "train.progress=false", "--set", "train.eval_batch_size=256")
    assert r.exit_code == 0, r.output
    task = json.loads((out / "prompt" / "task.json").read_text())
    assert task["labels"] == ["negative", "positive"]
    r = invoke("predict", "--prompt", out, "--model", model, "a gem of a film", "a dull mess")
    assert r.exit_code == 0, r.output
    predictions = [json.loads(line)["prediction"] for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(predictions) == 2
    assert all(p["label"] in ("negative", "positive") and set(p["scores"]) == {"negative", "positive"}
               for p in predictions)
    r = invoke("eval", "--prompt", out, "--model", model, "--split", "dev")
    assert r.exit_code == 0, r.output
    named = json.loads(r.stdout.splitlines()[-1])
    # A folder saved before the recipe named its labels: the same head, labels "0" / "1".
    task["labels"] = ["0", "1"]
    (out / "prompt" / "task.json").write_text(json.dumps(task))
    r = invoke("eval", "--prompt", out, "--model", model, "--split", "dev")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1]) == named
