"""Readers and recipes: the real datasets of ../shared/data (row counts from its README) and
small temporary files for every kind of bad input (each error names the file and line)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt.data import (
    ENV_VAR,
    RECIPES,
    SPLITS,
    DataError,
    Examples,
    RecipeError,
    check_fields,
    check_labels,
    check_tags,
    lama_template,
    load_recipe,
    parse_hf_path,
    read_examples,
    resolve_data_root,
    split_facts,
)
from softprompt.errors import SoftPromptError
from softprompt.template import Mask, Virtual, parse_template

ROOT = resolve_data_root()
needs_data = pytest.mark.skipif(not (ROOT / "README.md").is_file(), reason=f"no shared data at {ROOT}")

# Row counts from ../shared/data/README.md.
SST2 = {"train": 67_349, "dev": 872}
RTE = {"train": 2_490, "dev": 277}
FEWGLUE_TEST = {"fewglue-boolq": 3_270, "fewglue-cb": 56, "fewglue-rte": 277, "fewglue-wic": 638}
WNUT17 = {"train": 3_394, "dev": 1_009, "test": 1_287}
LAMA_FACTS, LAMA_RELATIONS, LAMA_COMMON_VOCAB_FACTS = 29_411, 41, 25_245


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def raises_at(path: Path | str, line: int | None, *needles: str, unit: str = "line", exc=DataError):
    """pytest.raises that also checks the message names the file, the line and each needle."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc_info):
            handled = self.ctx.__exit__(*exc_info)
            message = str(self.info.value)
            assert str(path) in message, message
            if line is not None:
                assert f"{unit} {line}" in message and self.info.value.line == line, message
            for needle in needles:
                assert needle in message, (needle, message)
            return handled

    return _Check()


# -- real data: recipes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sst2():
    recipe = load_recipe("sst2")
    return recipe, {s: recipe.examples(s) for s in SPLITS}  # SST-2 train (67k lines) read once


@pytest.fixture(scope="module")
def lama():
    recipe = load_recipe("lama-trex")
    return recipe, {s: recipe.examples(s) for s in SPLITS}


@needs_data
def test_sst2_counts_fields_and_test_is_dev(sst2):
    recipe, ex = sst2
    assert {s: len(ex[s]) for s in ("train", "dev")} == SST2
    assert ex["test"] == ex["dev"] and "hidden" in recipe.notes
    assert set(ex["train"][0]) == {"text", "label"}
    assert ex["train"][0]["text"] == "hide new secretions from the parental units"  # surrounding space stripped
    assert Counter(e["label"] for e in ex["dev"]).keys() == {"negative", "positive"}  # the files' 0 / 1, named
    assert recipe.template_for("encoder", "verbalizer") == "[P:3] {text} [P:3] It was [MASK] ."


@needs_data
def test_rte_counts_fields_and_quotes_kept():
    recipe = load_recipe("rte")
    train, dev = recipe.examples("train"), recipe.examples("dev")
    assert {"train": len(train), "dev": len(dev)} == RTE
    assert recipe.examples("test") == dev
    assert set(train[0]) == {"idx", "premise", "hypothesis", "label"}
    assert {e["label"] for e in train} == {"entailment", "not_entailment"}
    # TSV is read without quoting: a '"' is text, and no record swallows the next line
    assert sum('"' in e["premise"] + e["hypothesis"] for e in train) > 100


@needs_data
@pytest.mark.parametrize("name", sorted(FEWGLUE_TEST))
def test_fewglue_counts_and_labels(name):
    recipe = load_recipe(name)
    ex = {s: recipe.examples(s) for s in SPLITS}
    assert (len(ex["train"]), len(ex["dev"]), len(ex["test"])) == (32, 32, FEWGLUE_TEST[name])
    labels = {e["label"] for s in SPLITS for e in ex[s]}
    assert labels == set(recipe.labels) == set(recipe.label_words)
    assert all(isinstance(e["label"], str) for e in ex["test"])
    if name in ("fewglue-boolq", "fewglue-wic"):  # JSON booleans -> "true" / "false"
        assert labels == {"true", "false"}
    assert "val.jsonl" in recipe.notes and recipe.files["test"].endswith("val.jsonl")


@needs_data
def test_cb_reports_macro_f1():
    assert load_recipe("fewglue-cb").metrics == ("accuracy", "macro_f1")


@needs_data
def test_wnut17_counts_tags_and_bom_stripped():
    recipe = load_recipe("wnut17")
    ex = {s: recipe.examples(s) for s in SPLITS}
    assert {s: len(v) for s, v in ex.items()} == WNUT17
    for sentences in ex.values():
        for s in sentences:
            assert len(s["tokens"]) == len(s["tags"]) > 0
            assert set(s["tags"]) <= set(recipe.labels)
            assert not any("\ufeff" in t for t in s["tokens"])
    dev = ex["dev"]
    assert not dev[0]["tokens"][0].startswith("\ufeff") and dev[0]["tokens"][0] == "Stabilized"
    # dev.conll's byte-order marks sit inside a token ("Dubbz\ufeff") and alone on its last line
    raw = (ROOT / "wnut17" / "dev.conll").read_text(encoding="utf-8")
    assert "Dubbz\ufeff\t" in raw
    assert any("Dubbz" in s["tokens"] for s in dev)
    lines = [ln for ln in raw.replace("\ufeff", "").split("\n") if ln.strip()]
    assert sum(len(s["tokens"]) for s in dev) == len(lines)
    assert recipe.metric == "f1" and recipe.template_for("encoder", "ner", deep=True) == "{tokens}"


@needs_data
def test_lama_counts_and_split_sizes(lama):
    recipe, ex = lama
    assert sum(len(v) for v in ex.values()) == LAMA_FACTS
    per_relation = {s: Counter(e["relation"] for e in ex[s]) for s in SPLITS}
    assert len(per_relation["train"]) == LAMA_RELATIONS
    for relation in per_relation["train"]:
        n = sum(per_relation[s][relation] for s in SPLITS)
        for s, fraction in zip(SPLITS, (0.6, 0.2, 0.2)):
            assert abs(per_relation[s][relation] - fraction * n) <= 1.5, (relation, s)
    assert "60/20/20" in recipe.notes and "seed 0" in recipe.notes
    assert recipe.metric == "precision_at_1"
    assert json.loads(json.dumps(recipe.to_dict()))["data_root"] == str(ROOT)


@needs_data
def test_lama_split_is_disjoint_and_deterministic(lama):
    recipe, ex = lama
    uuids = [{e["uuid"] for e in ex[s]} for s in SPLITS]
    facts = [{(e["relation"], e["X"], e["Y"]) for e in ex[s]} for s in SPLITS]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not uuids[a] & uuids[b] and not facts[a] & facts[b]
    again = load_recipe("lama-trex")
    assert all(again.examples(s) == ex[s] for s in SPLITS)
    # stable across processes, whatever the string-hash seed
    code = ("import hashlib; from softprompt.data import load_recipe; "
            "test = load_recipe('lama-trex').examples('test'); "
            "print(hashlib.sha256(' '.join(e['uuid'] for e in test).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", SOFTPROMPT_DATA=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == hashlib.sha256(" ".join(e["uuid"] for e in ex["test"]).encode()).hexdigest()
    other_seed = {e["uuid"] for e in dataclasses.replace(recipe, seed=1).examples("test")}
    assert other_seed != uuids[2]


@needs_data
def test_lama_one_relation_and_manual_template(lama):
    _, ex = lama
    p19 = load_recipe("lama-trex:P19")
    relations = {json.loads(ln)["relation"]: json.loads(ln)["template"]
                 for ln in (ROOT / "lama" / "relations.jsonl").read_text().splitlines() if ln.strip()}
    for s in SPLITS:
        part = p19.examples(s)
        assert part == [e for e in ex[s] if e["relation"] == "P19"]
        assert all(e["manual_template"] == relations["P19"] == "[X] was born in [Y] ." for e in part)
    assert p19.templates["masked"] == "{X} was born in [MASK] ."
    assert p19.templates["causal"] == "{X} was born in [MASK]"
    assert p19.template_for("causal", "lama", deep=True) == "{X} was born in [MASK]"
    assert p19.template_for("causal", "lama") == "[P:3] {X} [P:3] [MASK]"
    assert load_recipe("lama-trex:p19").name == "lama-trex:P19"
    assert len(p19.candidates()) == 11_227


@needs_data
def test_lama_common_vocab_filter():
    recipe = dataclasses.replace(load_recipe("lama-trex"), common_vocab_only=True)
    vocab = set(recipe.candidates())
    ex = {s: recipe.examples(s) for s in SPLITS}
    assert sum(len(v) for v in ex.values()) == LAMA_COMMON_VOCAB_FACTS
    assert all(e["Y"] in vocab for v in ex.values() for e in v)


@needs_data
def test_every_recipe_template_parses_and_fits_its_examples():
    for name in RECIPES:
        recipe = load_recipe(name)
        train = recipe.examples("dev")[:20]
        assert recipe.metric in recipe.metrics
        if recipe.label_words is not None:
            assert list(recipe.label_words) == recipe.labels
        for key, source in recipe.templates.items():
            template = parse_template(source)
            assert set(template.fields) <= set(train[0]), (name, key)
            has_virtual = any(isinstance(i, Virtual) for i in template.items)
            assert has_virtual == key.startswith("p-tuning"), (name, key)
            if key in ("masked", "causal") or key.startswith("p-tuning"):
                assert template.has_mask, (name, key)
            if key.endswith("causal"):  # a causal LM reads the answer at the end
                assert isinstance(template.items[-1], Mask), (name, key)


def test_template_for_picks_by_kind_head_and_method():
    recipe = RECIPES["rte"]
    causal = "{premise} [P:3] Question: {hypothesis} ? [P:3] Answer: [MASK]"
    assert recipe.template_for("causal", "verbalizer") == causal
    assert recipe.template_for("encoder", "verbalizer", deep=True) == recipe.templates["masked"]
    assert recipe.template_for("causal", "verbalizer", method="prompt-tuning") == recipe.templates["causal"]
    assert recipe.template_for("encoder", "classification", deep=True) == "{premise} Question: {hypothesis} ?"
    from softprompt.architecture import ModelKind

    assert recipe.template_for(ModelKind.CAUSAL, None) == recipe.templates["p-tuning-causal"]
    assert RECIPES["sst2"].template_for("seq2seq", "verbalizer", deep=True) == "{text} It was [MASK] ."
    assert RECIPES["fewglue-boolq"].label_words == {"true": ["Yes"], "false": ["No"]}
    assert RECIPES["fewglue-cb"].label_words["neutral"] == ["Maybe"]


# -- data root and recipe errors -----------------------------------------------------------------
def test_data_root_order(tmp_path, monkeypatch):
    given, env = tmp_path / "given", tmp_path / "env"
    monkeypatch.setenv(ENV_VAR, str(env))
    assert resolve_data_root(given) == given  # the argument wins, existing or not
    assert resolve_data_root() == env
    monkeypatch.delenv(ENV_VAR)
    work = tmp_path / "proj" / "main"
    work.mkdir(parents=True)
    (tmp_path / "proj" / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert resolve_data_root() == (tmp_path / "proj" / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path)  # no ../shared/data here: the one beside the repository
    beside_repo = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    expected = beside_repo.resolve() if beside_repo.is_dir() else tmp_path.parent / "shared" / "data"
    assert resolve_data_root() == expected


def test_recipe_with_missing_files_lists_paths(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe("sst2", data_root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "sst2" / "train.tsv") in message and str(tmp_path / "sst2" / "dev.tsv") in message
    with pytest.raises(RecipeError, match="relations.jsonl"):
        load_recipe("lama-trex", data_root=tmp_path)


def test_recipe_env_root_is_used(tmp_path, monkeypatch):
    (tmp_path / "fewglue" / "CB").mkdir(parents=True)
    row = json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0})
    for f in ("train.jsonl", "dev32.jsonl", "val.jsonl"):
        (tmp_path / "fewglue" / "CB" / f).write_text(row + "\n")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    expected = [{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}]
    assert load_recipe("fewglue-cb").examples("test") == expected
    (tmp_path / "fewglue" / "CB" / "val.jsonl").write_text(row.replace("neutral", "maybe") + "\n")
    with raises_at(tmp_path / "fewglue" / "CB" / "val.jsonl", 1, "unknown label 'maybe'", "neutral"):
        load_recipe("fewglue-cb").examples("test")


def test_unknown_recipe_split_and_relation():
    with pytest.raises(RecipeError) as info:
        load_recipe("sst")
    assert "did you mean 'sst2'" in str(info.value) and "fewglue-cb" in str(info.value)
    assert isinstance(info.value, SoftPromptError)
    with pytest.raises(RecipeError, match="takes no"):
        load_recipe("sst2:P19")
    with pytest.raises(RecipeError, match="'dev' is the validation split"):
        RECIPES["sst2"].examples("validation")


@needs_data
def test_unknown_lama_relation_lists_known():
    with pytest.raises(RecipeError) as info:
        load_recipe("lama-trex:P9999")
    assert "P19" in str(info.value) and "P9999" in str(info.value)


# -- readers: formats ----------------------------------------------------------------------------
def test_jsonl_fields_and_label_normalisation(tmp_path):
    content = '{"q": "x", "label": true}\n\n{"q": "y", "label": 1}\n{"q": "z", "label": null}\n'
    path = write(tmp_path, "a.jsonl", content)
    assert read_examples(path, fields={"q": "question"}) == [
        {"question": "x", "label": "true"}, {"question": "y", "label": "1"}, {"question": "z"}]
    path = write(tmp_path, "b.jsonl", '{"t": "x", "sentiment": 0}\n')
    assert read_examples(path, label_field="sentiment", labels=[0, 1]) == [{"t": "x", "label": "0"}]


def test_json_list_and_json_lines_under_json(tmp_path):
    path = write(tmp_path, "a.json", '[\n  {"text": "a", "label": "x"},\n  {"text": "b",\n   "label": "y"}\n]\n')
    assert read_examples(path) == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    with raises_at(path, 3, "unknown label 'y'"):  # the line where the object starts
        read_examples(path, labels=["x"])
    path = write(tmp_path, "b.json", '{"text": "a"}\n{"text": "b"}\n')
    assert [e["text"] for e in read_examples(path)] == ["a", "b"]


def test_csv_quotes_multiline_and_tsv_no_quoting(tmp_path):
    path = write(tmp_path, "a.csv", 'text,label\n"a, ""quoted""\nline",pos\n b ,neg\n')
    assert read_examples(path) == [{"text": 'a, "quoted"\nline', "label": "pos"}, {"text": "b", "label": "neg"}]
    path = write(tmp_path, "a.tsv", 'sentence\tlabel\nhe said "hi\t1\nbye" then\t0\n')
    assert read_examples(path, fields={"sentence": "text"}) == [
        {"text": 'he said "hi', "label": "1"}, {"text": 'bye" then', "label": "0"}]
    path = write(tmp_path, "crlf.csv", "text,label\r\nx,1\r\n")
    assert read_examples(path) == [{"text": "x", "label": "1"}]


def test_conll_variants(tmp_path):
    path = write(tmp_path, "a.conll", "\ufeff-DOCSTART- O\n\nEU B-ORG\r\nrejects O\n\n\t\nGerman NNP B-NP B-MISC\n")
    assert read_examples(path) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                                   {"tokens": ["German"], "tags": ["B-MISC"]}]
    path = write(tmp_path, "b.txt", "a\tO\n")
    assert read_examples(path, format="conll") == [{"tokens": ["a"], "tags": ["O"]}]
    with raises_at(path, 1, "unknown tag 'O'"):
        read_examples(path, format="conll", labels=["B-X", "I-X"])


def test_hf_path_parsing():
    assert parse_hf_path("hf:glue/sst2:validation") == ("glue", "sst2", "validation")
    assert parse_hf_path("hf:imdb") == ("imdb", None, None)
    assert parse_hf_path("hf:imdb:test") == ("imdb", None, "test")
    assert parse_hf_path("hf:nyu-mll/glue/rte:train") == ("nyu-mll/glue", "rte", "train")
    assert parse_hf_path("hf:stanfordnlp/imdb/") == ("stanfordnlp/imdb", None, None)
    for bad in ("hf:", "hf:glue/sst2:", "hf:a/b/c/d", "hf:/sst2"):
        with pytest.raises(DataError):
            parse_hf_path(bad)


def test_hf_source_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 7}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with raises_at("hf:glue/sst2:validation", 2, "unknown label '7'", unit="row"):
        read_examples("hf:glue/sst2:validation", fields={"sentence": "text"}, labels=["0", "1"])
    assert calls == [("glue", "sst2", "validation")]
    assert read_examples("hf:glue/sst2")[0] == {"sentence": "good", "label": "1"}
    assert calls[-1] == ("glue", "sst2", "train")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hf:imdb.*ConnectionError: no network"):
        read_examples("hf:imdb")


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert read_examples(tmp_path / "one", fields={"sentence": "text"}) == [
        {"text": "good", "label": "1"}, {"text": "bad", "label": "0"}]
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                 "validation": datasets.Dataset.from_list(rows[:1])})
    both.save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError, match="validation"):
        read_examples(tmp_path / "both")
    assert len(read_examples(tmp_path / "both", split="validation")) == 1
    assert len(read_examples(f"{tmp_path / 'both'}:train")) == 2
    with raises_at(tmp_path / "both", None, "no split 'test'"):
        read_examples(tmp_path / "both", split="test")
    (tmp_path / "plain").mkdir()
    with raises_at(tmp_path / "plain", None, "save_to_disk"):
        read_examples(tmp_path / "plain")


# -- readers: bad input, each naming file and line ------------------------------------------------
def test_missing_file_names_path(tmp_path):
    with raises_at(tmp_path / "nope.jsonl", None, "no such file"):
        read_examples(tmp_path / "nope.jsonl")
    with raises_at(tmp_path / "x.parquet", None, "suffix", ".jsonl"):
        read_examples(write(tmp_path, "x.parquet", "1"))


def test_missing_field_names_it_and_lists_available(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"sentence": "a", "label": "1"}\n{"sentance": "b", "label": "0"}\n')
    with raises_at(path, 2, "missing field 'sentence'", "did you mean 'sentance'", "available: sentance, label"):
        read_examples(path, fields={"sentence": "text"})
    with raises_at(path, 1, "missing field 'premise'"):
        read_examples(path, required=["premise"])
    path = write(tmp_path, "a.csv", "text,lbl\nx,1\n")
    with raises_at(path, 1, "missing column 'label'", "available: text, lbl"):
        read_examples(path, labels=["1"])


def test_csv_record_with_wrong_value_count_names_its_line(tmp_path):
    path = write(tmp_path, "a.csv", 'text,label\n"multi\nline",1\nx,1,extra\n')
    with raises_at(path, 4, "3 values", "header (line 1) has 2 columns"):
        read_examples(path)
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\nb\tc\t0\n")
    with raises_at(path, 3, "a tab inside a value"):
        read_examples(path)


def test_unknown_label_names_line(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\na\t1\nb\t2\n")
    with raises_at(path, 3, "unknown label '2'", "known labels: ['0', '1']"):
        read_examples(path, labels=["0", "1"])
    path = write(tmp_path, "b.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b"}\n')
    with raises_at(path, 2, "missing field 'label'"):
        read_examples(path, labels=["pos", "neg"])


@pytest.mark.parametrize("name,content,note", [
    ("a.jsonl", "", "the file is empty"), ("b.jsonl", "\n \n", "the file is empty"), ("c.csv", "text,label\n", ""),
    ("d.conll", "\n\n\t\n", ""), ("e.json", "[]", ""), ("f.tsv", "\ufeff", "the file is empty"),
])
def test_empty_file_has_no_examples(tmp_path, name, content, note):
    path = write(tmp_path, name, content)
    with raises_at(path, None, "no examples", note):
        read_examples(path)


def test_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a"}\n{"text": "b",, }\n')
    with raises_at(path, 2, "column 14", "invalid JSON"):
        read_examples(path)
    path = write(tmp_path, "b.json", '[\n {"text": "a"},\n {"text": }\n]')
    with raises_at(path, 3, "column 11", "invalid JSON"):
        read_examples(path)
    path = write(tmp_path, "c.jsonl", '{"text": "a"}\n["not", "an", "object"]\n')
    with raises_at(path, 2, "expected a JSON object"):
        read_examples(path)
    path = write(tmp_path, "d.json", '[{"text": "a"},\n 3]')
    with raises_at(path, 2, "found a int"):
        read_examples(path)


def test_non_utf8_names_line_and_byte(tmp_path):
    path = write(tmp_path, "a.tsv", "sentence\tlabel\nok\t1\ncaf\xe9\t0\n".encode("latin-1"))
    with raises_at(path, 3, "not UTF-8", "0xe9", "byte offset 23", "byte 4 of the line"):
        read_examples(path)
    path = write(tmp_path, "b.jsonl", '{"text": "a"}\n'.encode("utf-16"))
    with raises_at(path, 1, "UTF-16"):
        read_examples(path)


def test_conll_line_without_tag(tmp_path):
    path = write(tmp_path, "a.conll", "EU\tB-ORG\nrejects\tO\n\nGerman\n")
    with raises_at(path, 4, "no tag", "'German'"):
        read_examples(path)
    path = write(tmp_path, "b.conll", "EU\t\n")
    with raises_at(path, 1, "no tag"):
        read_examples(path)


@pytest.mark.parametrize("name,content,line,says", [
    ("a.jsonl", '{"text": "a"}\n\n{"text": "ok", "extra": "x \\ud800 y"}\n', 3,
     "field 'extra' is not valid Unicode (a lone surrogate, U+D800 at character 3)"),
    ("b.json", '[{"tokens": ["a"], "tags": ["O"]},\n {"tokens": ["a", "\\udfff"], "tags": ["O", "O"]}]', 2,
     "field 'tokens' item 2 is not valid Unicode (a lone surrogate, U+DFFF"),
    ("c.jsonl", '{"\\ud83d": "a"}\n', 1, "a field name ('\\ud83d') is not valid Unicode"),
    ("d.jsonl", '{"text": "a"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", 2, "nested too deeply"),
])
def test_lone_surrogate_escape_names_line_and_field(tmp_path, name, content, line, says):
    """JSON's \\ud800 parses to a string no tokenizer can take: refused where it is read,
    at any depth, keys included (and JSON nested past the parser's limit too)."""
    path = write(tmp_path, name, content)
    with raises_at(path, line, says):
        read_examples(path)
    assert read_examples(write(tmp_path, "ok.jsonl", '{"text": "\\ud83d\\ude00"}\n')) == [{"text": "\U0001F600"}]


def test_examples_remember_their_lines_and_columns(tmp_path):
    path = write(tmp_path, "a.jsonl", '\n{"review": "a", "answer": 1}\n\n\n{"review": "b", "answer": "1"}\n')
    examples = read_examples(path, fields={"review": "text"}, label_field="answer")
    assert isinstance(examples, Examples) and examples.lines == [2, 5] and examples.path == str(path)
    assert examples == [{"text": "a", "label": "1"}, {"text": "b", "label": "1"}]  # 1 and "1": one label
    assert examples.columns == {"text": "review", "label": "answer"}
    conll = read_examples(write(tmp_path, "b.conll", "-DOCSTART-\tO\n\nA\tO\nB\tO\n\nC\tO\n"))
    assert conll.lines == [3, 6] and conll.word_per_line


@pytest.mark.parametrize("value,says", [
    (None, "field 'review' (read as 'text') is null"), (5, "must be a string, got int"),
    ("", "field 'review' (read as 'text') is empty"), (" \t", "is empty"), (["a"], "must be a string, got list"),
    ("\ud800", "not valid Unicode (a lone surrogate"),
])
def test_check_fields_names_line_and_column(tmp_path, value, says):
    rows = [{"review": "fine", "label": "pos"}] * 4 + [{"review": value, "label": "pos"}]
    path = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:4]))
    examples = read_examples(path, fields={"review": "text"})
    examples.append(rows[4] | {"text": value})
    examples.lines.append(7)
    with raises_at(path, 7, says):
        check_fields(examples, ["text"])
    check_fields(examples[:4], ["text"])  # a plain list: no line, the example's number
    with pytest.raises(DataError, match=r"^the dev split, example 5: no field 'text' used by the template '\{text\}'"):
        check_fields([{"text": "a"}] * 4 + [{}], ["text"], source="the dev split", template="{text}")


def test_check_labels_every_row_against_the_known_ones(tmp_path):
    path = write(tmp_path, "a.csv", "text,label\na,pos\nb,neg\nc,\nd,1\n")
    examples = read_examples(path)
    with raises_at(path, 4, "field 'label' is an empty label"):
        check_labels(examples)
    assert check_labels(examples[:2]) == ["neg", "pos"]
    del examples[2], examples.lines[2]
    with raises_at(path, 5, "unknown label '1'; the training labels: ['neg', 'pos']"):
        check_labels(examples, ["neg", "pos"], "the training labels")
    path = write(tmp_path, "b.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with raises_at(path, 2, "no label: field 'label' is missing or null"):
        check_labels(read_examples(path), ["1"])
    path = write(tmp_path, "c.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')
    with raises_at(path, 2, "field 'label': a label must be a finite number, got nan"):
        read_examples(path)


def test_check_tags_names_the_word_and_its_line(tmp_path):
    path = write(tmp_path, "a.conll", "A\tO\nB\tB-X\n\nC\tO\nD\tO\nE\tB-Y\n")
    examples = read_examples(path)
    assert check_tags(examples[:1]) == ["B-X", "O"]
    with raises_at(path, 6, "unknown tag 'B-Y' (did you mean 'B-X'?) of word 3 ('E'); the training tags: ['B-X', 'O']"):
        check_tags(examples, ["O", "B-X"], "the training tags")
    rows = [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a", "b"], "tags": ["O", None]},
            {"tokens": ["a", "b"], "tags": ["O"]}, {"tokens": ["a"], "tags": "O"}, {"tokens": ["a"]}]
    path = write(tmp_path, "b.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    examples = read_examples(path)
    for i, says in [(1, "the tag of word 2 ('b') is null, not a string"), (2, "1 tags in 'tags' for 2 words"),
                    (3, "field 'tags' must be a list of tags, got str"), (4, "no field 'tags'")]:
        with raises_at(path, i + 1, says):
            check_tags(Examples([examples[0], examples[i]], str(path), [1, i + 1]))


def test_errors_are_softprompt_errors():
    assert issubclass(DataError, SoftPromptError) and issubclass(DataError, ValueError)
    assert issubclass(RecipeError, DataError)


# -- properties ---------------------------------------------------------------------------------
cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(cell, cell).filter(lambda r: any(v.strip() for v in r)), min_size=1, max_size=6))
def test_csv_round_trip(tmp_path_factory, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    path = write(tmp_path_factory.mktemp("csv"), "a.csv", buffer.getvalue())
    assert read_examples(path) == [{"text": t.strip(), "label": lab.strip()} for t, lab in rows]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), bad=st.integers(0, 11), blanks=st.sets(st.integers(0, 12), max_size=4))
def test_jsonl_error_line_is_exact(tmp_path_factory, n, bad, blanks):
    bad %= n
    lines = []
    for i in range(n):
        if i in blanks:
            lines.append("")
        lines.append(json.dumps({"text": str(i), "label": "x" if i == bad else "ok"}))
    path = write(tmp_path_factory.mktemp("jsonl"), "a.jsonl", "\n".join(lines) + "\n")
    expected = lines.index(json.dumps({"text": str(bad), "label": "x"})) + 1
    with raises_at(path, expected, "unknown label 'x'"):
        read_examples(path, labels=["ok"])


fact = st.tuples(st.sampled_from("abcdefgh"), st.sampled_from("xyz"))


@settings(max_examples=80, deadline=None)
@given(pairs=st.lists(fact, max_size=40), seed=st.integers(0, 3), order=st.randoms(use_true_random=False))
def test_split_facts_partitions_stably(pairs, seed, order):
    facts = [{"X": x, "Y": y, "relation": "P1", "uuid": f"u{i}"} for i, (x, y) in enumerate(pairs)]
    parts = split_facts(facts, seed)
    ids = {s: [f["uuid"] for f in parts[s]] for s in SPLITS}
    assert sorted(u for v in ids.values() for u in v) == sorted(f["uuid"] for f in facts)
    n, unique = len(facts), len(set(pairs)) == len(pairs)
    for cut, fraction in ((len(parts["train"]), 0.6), (len(parts["train"]) + len(parts["dev"]), 0.8)):
        assert cut == int(fraction * n + 0.5) if unique else cut >= int(fraction * n + 0.5)
    where = {}
    for s in SPLITS:  # copies of one fact never straddle two splits
        for f in parts[s]:
            assert where.setdefault((f["X"], f["Y"]), s) == s
    shuffled = list(facts)
    order.shuffle(shuffled)
    assert {s: [f["uuid"] for f in v] for s, v in split_facts(shuffled, seed).items()} == ids


def test_lama_template_conversion():
    assert lama_template("[X] was born in [Y] .") == "{X} was born in [MASK] ."
    assert lama_template("[X] and [Y] are twin cities .", causal=True) == "{X} and [MASK]"
    assert lama_template("The capital of [X] is [Y] .", causal=True) == "The capital of {X} is [MASK]"
    assert lama_template("{odd} [X] [Y]") == "{{odd}} {X} [MASK]"
    with pytest.raises(DataError, match="one \\[X\\]"):
        lama_template("[X] is [X]")
    with pytest.raises(DataError, match="causal"):
        lama_template("[Y] contains [X] .", causal=True)
