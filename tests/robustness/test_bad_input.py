"""The bad-input matrix: every way a user can hand softprompt something wrong, one test per
case, across run configuration, templates, data files, models and saved files.

Each case runs as a user would (the `softprompt` CLI, in process) and asserts three things:
the command fails with exit status 1 and one line ``error: ...`` (no traceback); the line
names the problem (the file, line, column, field or key, and what was expected); and the
workspace (data, models, any previous run or prompt, hidden and temporary files included)
is exactly as it was: nothing written, removed or half-written. docs/RELIABILITY.md lists
the matrix, and the last test checks that it lists exactly these cases.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import softprompt as sp
from softprompt.cli import app

from conftest import make_bert, make_gpt2
from footprint import changes, tree

ROOT = Path(__file__).resolve().parents[2]
POS = ["a gem of a film", "wonderful acting", "great fun", "a delight", "moving and funny", "superb"]
NEG = ["a dull mess", "terrible plot", "boring", "a waste of time", "awful dialogue", "tedious"]
ROWS = [{"review": t, "label": "pos"} for t in POS] + [{"review": t, "label": "neg"} for t in NEG]
QUICK = ["--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "train.batch_size=4",
         "--set", "train.progress=false"]


# -- the workspace -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, wordpiece_tokenizer, gpt2_tokenizer):
    """Tiny random models saved as folders, as a user's own checkpoints are."""
    root = tmp_path_factory.mktemp("models")
    bert, gpt2 = root / "tiny-bert", root / "tiny-gpt2"
    torch.manual_seed(0)
    make_bert(wordpiece_tokenizer).bert.save_pretrained(bert)
    wordpiece_tokenizer.save_pretrained(bert)
    make_gpt2(gpt2_tokenizer).save_pretrained(gpt2)
    gpt2_tokenizer.save_pretrained(gpt2)
    return {"bert": bert, "gpt2": gpt2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models):
    """One real run directory (a few steps) whose prompt folder the file cases start from."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "reviews.jsonl"
    write_jsonl(data, ROWS)
    r = cli("train", "--model", models["bert"], "--method", "p-tuning-v2", "--task", "classification",
            "--train", data, "--eval", data, "--field", "review:text", "--output", root / "run", *QUICK)
    assert r.exit_code == 0, r.output
    return root / "run"


@pytest.fixture
def ws(tmp_path, models):
    """A user's folder: the data file and (once trained) the run; `models` sit beside it."""
    write_jsonl(tmp_path / "reviews.jsonl", ROWS)
    return tmp_path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(ws: Path, models, *extra, data: Path | None = None, model: str = "bert", model_path=None,
               eval_data: Path | None = None):
    data = data or ws / "reviews.jsonl"
    return ["train", "--model", model_path or models[model], "--task", "classification", "--train", data,
            "--eval", eval_data or data, "--field", "review:text", "--output", ws / "run", *QUICK, *extra]


def refused(watched: list[Path], *args, says: list[str]) -> str:
    """Run the CLI, assert one ``error:`` message containing every fragment of `says`
    (case-sensitive; regexes where they start with ``re:``) and that nothing under
    `watched` changed; returns the line."""
    before = [tree(p) for p in watched]
    r = cli(*args)
    assert r.exit_code == 1, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output, r.output
    lines = r.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    # one error, last; only the template's caret picture (indented lines) may follow it
    assert len(starts) == 1 and all(line.startswith("  ") or not line.strip() for line in lines[starts[0] + 1:]), r.stderr
    message = lines[starts[0]]
    for fragment in says:
        if fragment.startswith("re:"):
            assert re.search(fragment[3:], message), (fragment, message)
        else:
            assert fragment in message, (fragment, message)
    for path, old in zip(watched, before):
        assert not changes(old, tree(path)), changes(old, tree(path))
    return message


# -- run configuration --------------------------------------------------------------------
def test_config_unknown_set_key(ws, models):
    refused([ws], *train_args(ws, models, "--set", "train.lrr=1"),
            says=["--set train.lrr=1", "unknown key 'train.lrr'", "did you mean 'train.lr'"])


def test_config_unknown_key_in_run_file_names_its_line(ws, models):
    (ws / "run.yaml").write_text("method: p-tuning-v2\ntrain:\n  steps: 2\n  lrr: 0.1\n")
    refused([ws], *train_args(ws, models, "--config", ws / "run.yaml"),
            says=[f"{ws / 'run.yaml'}, line 4", "unknown key 'train.lrr'", "did you mean 'train.lr'"])


def test_config_invalid_yaml_names_line_and_column(ws, models):
    (ws / "run.yaml").write_text("train:\n  steps: 2\n  lr: [0.1\n")
    refused([ws], *train_args(ws, models, "--config", ws / "run.yaml"),
            says=[str(ws / "run.yaml"), "invalid YAML", "re:line \\d+, column \\d+"])


def test_config_missing_run_file(ws, models):
    refused([ws], *train_args(ws, models, "--config", ws / "nope.yaml"), says=["nope.yaml", "no such config file"])


def test_config_value_of_the_wrong_type(ws, models):
    refused([ws], *train_args(ws, models, "--set", "train.steps=many"),
            says=["train.steps must be a positive integer", "'many'"])


@pytest.mark.parametrize("key,value,says", [
    ("train.lr", "-0.1", "train.lr must be positive"),
    ("train.warmup_ratio", "abc", "train.warmup_ratio must be a number in [0, 1)"),
    ("train.batch_size", "0", "train.batch_size must be a positive integer"),
    ("max_length", "-5", "max_length must be a positive integer"),
    ("num_virtual_tokens", "0", "num_virtual_tokens must be a positive integer"),
])
def test_config_value_out_of_range(ws, models, key, value, says):
    refused([ws], *train_args(ws, models, "--set", f"{key}={value}"), says=[says, value])


def test_config_unknown_method(ws, models):
    refused([ws], *train_args(ws, models, "--method", "lora"), says=["unknown method 'lora'", "p-tuning-v2"])


def test_config_unknown_prompt_field(ws, models):
    refused([ws], *train_args(ws, models, "--method", "p-tuning", "--set", "prompt.encodr=mlp"),
            says=["unknown key 'prompt.encodr'", "did you mean 'prompt.encoder'"])


def test_config_unknown_recipe_lists_the_known_ones(ws, models):
    refused([ws], "train", "--model", models["bert"], "--task", "sst3", "--output", ws / "run", *QUICK,
            says=["unknown recipe 'sst3'", "sst2", "fewglue-rte"])


@pytest.mark.parametrize("device,says", [("gpu", "got 'gpu'"), ("cuda:3", "cuda:3")])
def test_config_bad_or_missing_device(ws, models, device, says):
    if device.startswith("cuda") and torch.cuda.device_count() > 3:
        pytest.fail("this case needs a machine with fewer than 4 GPUs")
    refused([ws], *train_args(ws, models, "--set", f"device={device}"), says=[says])


def test_config_output_already_holds_a_run(ws, models, trained):
    run = ws / "run"
    cli("train", *train_args(ws, models)[1:])
    assert (run / "checkpoint").is_dir()
    refused([ws], *train_args(ws, models), says=[str(run), "already holds a run", "--resume", "--overwrite"])


def test_config_overwrite_refused_for_bad_data_keeps_the_previous_run(ws, models):
    """--overwrite replaces a run only once the new one has everything it needs."""
    assert cli(*train_args(ws, models)).exit_code == 0
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:3] + [{"text": "no review field", "label": "pos"}])
    refused([ws], *train_args(ws, models, "--overwrite", data=bad), says=[str(bad), "line 4", "missing field 'review'"])


def test_config_resume_without_a_checkpoint(ws, models):
    (ws / "run").mkdir()
    refused([ws], *train_args(ws, models, "--resume"), says=[str(ws / "run" / "config.json"), "missing"])


def test_config_resume_with_a_corrupt_config_names_line_and_column(ws, models):
    assert cli(*train_args(ws, models)).exit_code == 0
    (ws / "run" / "config.json").write_text('{\n  "model": "x",\n  oops\n}\n')
    refused([ws], *train_args(ws, models, "--resume"),
            says=[str(ws / "run" / "config.json"), "invalid JSON at line 3, column 3"])


def test_config_resume_with_a_checkpoint_of_another_prompt(ws, models):
    assert cli(*train_args(ws, models, "--set", "train.eval_every=1")).exit_code == 0
    config = json.loads((ws / "run" / "config.json").read_text())
    config["num_virtual_tokens"] = 8  # the recorded run edited by hand: its checkpoint has 20
    (ws / "run" / "config.json").write_text(json.dumps(config))
    refused([ws], *train_args(ws, models, "--resume"),
            says=[str(ws / "run" / "checkpoint"), "does not fit this run's prompt and task", "size mismatch"])


# -- templates -----------------------------------------------------------------------------
def test_template_without_placeholder(ws, models):
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", "[P:4] hello"),
            says=["[P:4] hello", "placeholder"])


def test_template_with_two_masks_names_the_column(ws, models):
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", "[P:2] {text} [MASK] [MASK]"),
            says=["[MASK]", "column 21"])


def test_template_unclosed_placeholder_names_the_column(ws, models):
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", "[P:2] {text"),
            says=["column 7"])


def test_template_zero_virtual_tokens(ws, models):
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", "[P:0] {text}"),
            says=["virtual-token count must be at least 1", "column 4"])


def test_template_field_missing_from_the_data(ws, models):
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", "[P:2] {text} {hypothesis}"),
            says=[str(ws / "reviews.jsonl"), "line 1", "no field 'hypothesis'", "--field"])


def test_template_deep_method_with_input_slots(ws, models):
    refused([ws], *train_args(ws, models, "--method", "p-tuning-v2", "--template", "[P:2] {text}"),
            says=["PTuningV2Config", "remove the [P:n] slots"])


def test_template_field_after_the_mask_on_a_causal_lm(ws, models):
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", "[P:2] [MASK] {text}",
                              "--labels", "pos:good", "--labels", "neg:bad", model="gpt2"),
            says=["'text'", "after [MASK]"])


def test_template_fixed_part_longer_than_the_limit(ws, models):
    anchor = " ".join(["word"] * 40)
    refused([ws], *train_args(ws, models, "--method", "prompt-tuning", "--template", f"[P:4] {anchor} {{text}}",
                              "--set", "max_length=16"),
            says=["16"])


# -- data files ----------------------------------------------------------------------------
def test_data_missing_field_names_file_and_line(ws, models):
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:2] + [{"text": "x", "label": "pos"}] + ROWS[2:])
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "line 3", "missing field 'review'"])


def test_data_unknown_label_names_file_line_and_known_labels(ws, models):
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:3] + [{"review": "meh", "label": "neutral"}])
    refused([ws], *train_args(ws, models, "--labels", "neg", "--labels", "pos", data=bad),
            says=[str(bad), "line 4", "unknown label 'neutral'", "neg", "pos"])


def test_data_empty_file(ws, models):
    bad = ws / "empty.jsonl"
    bad.write_text("")
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "no examples"])


def test_data_not_utf8_names_the_line(ws, models):
    bad = ws / "latin1.jsonl"
    bad.write_bytes(b'{"review": "fine", "label": "pos"}\n{"review": "caf\xe9", "label": "neg"}\n')
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "not UTF-8", "line 2"])


def test_data_invalid_json_names_line_and_column(ws, models):
    bad = write_jsonl(ws / "bad.jsonl", [json.dumps(ROWS[0]), '{"review": "x", "label": pos}'])
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "line 2, column 26", "invalid JSON"])


def test_data_csv_missing_column(ws, models):
    bad = ws / "bad.csv"
    bad.write_text("sentence,label\na gem,pos\ndull,neg\n")
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "missing column 'review'"])


def test_data_csv_row_with_too_many_values(ws, models):
    bad = ws / "bad.csv"
    bad.write_text("review,label\na gem,pos\ndull,neg,extra\n")
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "line 3", "3 values"])


def test_data_conll_line_without_a_tag(ws, models):
    bad = ws / "bad.conll"
    bad.write_text("Anna\tB-PER\nlives\tO\n\nParis\n")
    refused([ws], "train", "--model", models["bert"], "--task", "ner", "--train", bad, "--eval", bad,
            "--output", ws / "run", *QUICK, says=[str(bad), "line 4", "no tag"])


def test_data_missing_file(ws, models):
    refused([ws], *train_args(ws, models, data=ws / "nope.jsonl"), says=["nope.jsonl", "no such file"])


def test_data_unknown_suffix(ws, models):
    bad = ws / "reviews.xlsx"
    bad.write_text("x")
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), "'.xlsx'", "jsonl"])


def test_data_label_word_not_one_token_of_the_vocabulary(ws, models, wordpiece_tokenizer):
    """A masked LM reads one token at [MASK]: a label word the vocabulary splits is refused."""
    mlm = ws / "tiny-mlm"
    make_bert(wordpiece_tokenizer).save_pretrained(mlm)
    wordpiece_tokenizer.save_pretrained(mlm)
    refused([ws], "train", "--model", mlm, "--method", "prompt-tuning", "--task", "classification",
            "--train", ws / "reviews.jsonl", "--field", "review:text", "--template", "[P:2] {text} [MASK]",
            "--eval", ws / "reviews.jsonl", "--labels", "pos:zxqvwy", "--labels", "neg:bad", "--output", ws / "run",
            *QUICK,
            says=["'zxqvwy'"])


# -- data files: every row of every split, each bad one named by file, line and field ---------
def test_data_eval_label_never_seen_in_training_on_a_later_line(ws, models):
    """Not only the first row: a dev label the training split lacks could never be predicted."""
    dev = write_jsonl(ws / "dev.jsonl", ROWS[:6] + [{"review": "meh", "label": "neutral"}] + ROWS[6:])
    refused([ws], *train_args(ws, models, eval_data=dev),
            says=[f"{dev}, line 7", "unknown label 'neutral'", "the known labels (from the training split): ['neg', 'pos']"])


def test_data_test_label_outside_the_declared_labels(ws, models):
    test = write_jsonl(ws / "test.jsonl", ROWS[:4] + [{"review": "meh", "label": "neutral"}])
    refused([ws], *train_args(ws, models, "--test", test, "--labels", "pos", "--labels", "neg"),
            says=[f"{test}, line 5", "unknown label 'neutral'", "(from --labels): ['pos', 'neg']"])


@pytest.mark.parametrize("split", ["train", "eval"])
def test_data_null_label_names_file_line_and_field(ws, models, split):
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:6] + [{"review": "meh", "label": None}] + ROWS[6:])
    refused([ws], *train_args(ws, models, **{"data" if split == "train" else "eval_data": bad}),
            says=[f"{bad}, line 7", "no label: field 'label' is missing or null"])


def test_data_label_of_another_type_names_file_line_and_field(ws, models):
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:2] + [{"review": "meh", "label": ["pos"]}])
    refused([ws], *train_args(ws, models, data=bad),
            says=[f"{bad}, line 3", "field 'label': a label must be a string, number or boolean, got list"])


@pytest.mark.parametrize("value,says", [
    (None, "field 'review' (read as 'text') is null"),
    ("", "field 'review' (read as 'text') is empty"),
    (7, "field 'review' (read as 'text') must be a string, got int"),
])
def test_data_bad_text_names_file_line_and_field(ws, models, value, says):
    dev = write_jsonl(ws / "dev.jsonl", ROWS[:5] + [{"review": value, "label": "pos"}] + ROWS[5:])
    refused([ws], *train_args(ws, models, eval_data=dev), says=[f"{dev}, line 6", says])


def test_data_lone_surrogate_in_jsonl_names_file_line_and_field(ws, models):
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:5] + ['{"review": "\\ud800 x", "label": "pos"}'] + ROWS[5:])
    refused([ws], *train_args(ws, models, data=bad),
            says=[f"{bad}, line 6", "field 'review' is not valid Unicode (a lone surrogate, U+D800 at character 1)"])


def test_data_json_nested_too_deeply(ws, models):
    bad = write_jsonl(ws / "bad.jsonl", ROWS[:2] + ['{"review": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "pos"}'])
    refused([ws], *train_args(ws, models, data=bad), says=[f"{bad}, line 3", "invalid JSON: nested too deeply"])


@pytest.mark.parametrize("row,says", [
    ("a gem,pos\n,neg\n", "line 3: field 'review' (read as 'text') is empty"),
    ("a gem,pos\ndull,\n", "line 3: field 'label' is an empty label"),
])
def test_data_csv_empty_cell_names_file_line_and_field(ws, models, row, says):
    bad = ws / "bad.csv"
    bad.write_text("review,label\n" + row)
    refused([ws], *train_args(ws, models, data=bad), says=[str(bad), says])


def test_data_csv_encoded_surrogate_is_not_utf8(ws, models):
    bad = ws / "bad.csv"
    bad.write_bytes(b"review,label\na gem,pos\nx \xed\xa0\x80,neg\n")
    refused([ws], *train_args(ws, models, data=bad), says=[f"{bad}, line 3", "not UTF-8", "0xed"])


def ner_args(ws: Path, models, train: Path, dev: Path):
    return ["train", "--model", models["bert"], "--task", "ner", "--train", train, "--eval", dev,
            "--output", ws / "run", *QUICK]


def test_data_conll_dev_tag_never_seen_in_training_names_its_line(ws, models):
    train = ws / "train.conll"
    train.write_text("Anna\tB-PER\nlives\tO\n\nBob\tB-PER\nsings\tO\n")
    dev = ws / "dev.conll"
    dev.write_text("Anna\tB-PER\nlives\tO\n\nBob\tB-PER\nsings\tO\nin\tO\nParis\tB-LOC\n")
    refused([ws], *ner_args(ws, models, train, dev),
            says=[f"{dev}, line 7", "unknown tag 'B-LOC' of word 4 ('Paris')",
                  "the known tags (from the training split): ['B-PER', 'O']"])


@pytest.mark.parametrize("row,says", [
    ({"tokens": ["Bob", "sings"], "tags": ["B-PER", None]}, "field 'tags': the tag of word 2 ('sings') is null"),
    ({"tokens": ["Bob", None], "tags": ["B-PER", "O"]}, "field 'tokens': word 2 is null"),
    ({"tokens": [], "tags": []}, "field 'tokens' is an empty list of words"),
    ({"tokens": ["Bob", "sings"], "tags": ["B-PER"]}, "1 tags in 'tags' for 2 words in 'tokens'"),
])
def test_data_ner_jsonl_bad_row_names_file_line_and_field(ws, models, row, says):
    good = {"tokens": ["Anna", "lives"], "tags": ["B-PER", "O"]}
    train = write_jsonl(ws / "train.jsonl", [good, good])
    dev = write_jsonl(ws / "dev.jsonl", [good, good, row])
    refused([ws], *ner_args(ws, models, train, dev), says=[f"{dev}, line 3", says])


@pytest.mark.parametrize("row,says", [
    ('{"text": null}', "field 'text' is null"),
    ('{"text": "\\udc80 x"}', "field 'text' is not valid Unicode (a lone surrogate, U+DC80 at character 1)"),
    ('{"text": ""}', "field 'text' is empty"),
    ('{"sentence": "a gem"}', "no field 'text' used by the template '{text}'"),
])
def test_data_predict_input_file_bad_row_names_file_line_and_field(ws, models, trained, row, says):
    inputs = write_jsonl(ws / "inputs.jsonl", [{"text": "a gem"}, row])
    refused([ws, trained], "predict", "--prompt", trained, "--model", models["bert"], "--input", inputs,
            says=[f"{inputs}, line 2", says])


def test_data_predict_argument_not_utf8(ws, models, trained):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates."""
    refused([ws, trained], "predict", "--prompt", trained, "--model", models["bert"], "a gem", "caf\udce9",
            says=["input 2 is not valid Unicode (a lone surrogate, U+DCE9 at character 4)"])


@pytest.mark.parametrize("row,says", [
    ({"review": "meh", "label": "neutral"}, "unknown label 'neutral'; the labels the prompt was trained for: ['neg', 'pos']"),
    ({"review": "meh", "label": None}, "no label: field 'label' is missing or null"),
    ({"review": None, "label": "pos"}, "field 'review' (read as 'text') is null"),
])
def test_data_eval_file_bad_row_names_file_line_and_field(ws, models, trained, row, says):
    data = write_jsonl(ws / "eval.jsonl", ROWS[:2] + [row])
    refused([ws, trained], "eval", "--prompt", trained, "--model", models["bert"], "--data", data,
            "--field", "review:text", says=[f"{data}, line 3", says])


def test_data_run_failing_in_its_first_step_leaves_no_folder(ws, models, monkeypatch):
    """Whatever stops a new run before it has anything to keep (here its first step, as a
    device out of memory would) removes the folders it made: the rerun needs no --overwrite."""
    from softprompt.errors import TrainingError
    from softprompt.training.loop import Loop

    def fail(self):
        raise TrainingError("the first step failed")

    monkeypatch.setattr(Loop, "forward_backward", fail)
    args = train_args(ws, models)
    args[args.index("--output") + 1] = ws / "runs" / "today" / "run"
    refused([ws], *args, says=["the first step failed"])
    assert not (ws / "runs").exists()
    monkeypatch.undo()
    assert cli(*args).exit_code == 0


OVERFLOW = ["--set", "train.lr=1e38", "--set", "train.head_lr=1e38", "--set", "train.schedule=constant"]
LARGE = ["--set", "train.lr=1e37", "--set", "train.head_lr=1e37", "--set", "train.schedule=constant"]


def stopped_line(r) -> tuple[str, int]:
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    line = r.stderr.strip().splitlines()[-1]
    found = re.search(r"non-finite (?:loss \(\w+\)|weights \([\w.]+\)) (?:at|after) step (\d+): stopped", line)
    assert found and "Lower the learning rate (train.lr=" in line, line
    return line, int(found.group(1))


def test_data_non_finite_weights_at_the_first_evaluation(ws, models):
    """A learning rate that overflows the weights in the first update: the run stops and
    says so, and leaves no checkpoint or prompt with those weights."""
    r = cli(*train_args(ws, models, *OVERFLOW, "--set", "train.eval_every=1"))
    line, step = stopped_line(r)
    assert step == 1 and "no checkpoint had been written yet" in line, line
    assert not (ws / "run" / "checkpoint").exists() and not (ws / "run" / "prompt").exists()


def test_data_non_finite_later_keeps_the_last_good_checkpoint(ws, models):
    """A learning rate whose first update leaves huge but finite weights: the step-1
    checkpoint is written, the step-2 loss overflows, and the step-1 checkpoint and prompt
    are what the run leaves (finite, loadable)."""
    line, step = stopped_line(cli(*train_args(ws, models, *LARGE, "--set", "train.eval_every=1")))
    assert step == 2 and f"the last good checkpoint ({ws / 'run' / 'checkpoint'})" in line, line
    assert json.loads((ws / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    tensors = sp.io.load_tensors(ws / "run" / "checkpoint" / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert cli("predict", "--prompt", ws / "run", "--model", models["bert"], "a gem").exit_code == 0


# -- models --------------------------------------------------------------------------------
def test_model_unknown_alias_lists_the_packaged_ones(ws, models):
    refused([ws], *train_args(ws, models, model_path="minilmm"),
            says=["minilmm", "minilm"])


def test_model_folder_without_weights(ws, models):
    (ws / "empty-model").mkdir()
    refused([ws], *train_args(ws, models, model_path=ws / "empty-model"),
            says=[str(ws / "empty-model")])


def test_model_folder_without_tokenizer(ws, models, wordpiece_tokenizer):
    folder = ws / "no-tokenizer"
    make_bert(wordpiece_tokenizer).bert.save_pretrained(folder)
    refused([ws], *train_args(ws, models, model_path=folder),
            says=[str(folder), "no tokenizer files"])


def test_model_folder_with_pickled_weights_only_is_never_unpickled(ws, models, wordpiece_tokenizer):
    folder = ws / "pickled"
    base = make_bert(wordpiece_tokenizer).bert
    base.config.save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    torch.save(base.state_dict(), folder / "pytorch_model.bin")
    refused([ws], *train_args(ws, models, model_path=folder),
            says=["pytorch_model.bin", "pickle", "safetensors"])


def test_model_deep_prompt_on_an_architecture_without_a_cache(ws, wordpiece_tokenizer):
    from transformers import DistilBertConfig, DistilBertModel

    folder = ws / "tiny-distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=len(wordpiece_tokenizer), dim=32, n_layers=2, n_heads=2,
                                     hidden_dim=37)).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    write_jsonl(ws / "r.jsonl", ROWS)
    refused([ws], "train", "--model", folder, "--method", "p-tuning-v2", "--task", "classification",
            "--train", ws / "r.jsonl", "--eval", ws / "r.jsonl", "--field", "review:text", "--output", ws / "run", *QUICK,
            says=["DistilBertModel", "takes no cache", "deep prompt"])


def test_model_prompt_saved_for_another_base(ws, models, trained):
    refused([ws, trained], "predict", "--prompt", trained, "--model", models["gpt2"], "a gem of a film",
            says=["another base model"])


# -- saved prompt files --------------------------------------------------------------------
@pytest.fixture
def prompt(ws, trained):
    """A copy of the trained prompt folder, to damage."""
    import shutil

    return Path(shutil.copytree(trained / "prompt", ws / "prompt"))


def predict(prompt: Path, models):
    return ["predict", "--prompt", prompt, "--model", models["bert"], "a gem of a film"]


def weights_file(prompt: Path) -> Path:
    return prompt / "prompt.safetensors"


def test_file_garbage_safetensors(ws, models, prompt):
    weights_file(prompt).write_bytes(b"\x00garbage" * 8)
    refused([ws], *predict(prompt, models), says=[str(weights_file(prompt)), "corrupt or truncated safetensors"])


def test_file_truncated_safetensors(ws, models, prompt):
    data = weights_file(prompt).read_bytes()
    weights_file(prompt).write_bytes(data[: len(data) // 2])
    refused([ws], *predict(prompt, models), says=[str(weights_file(prompt)), "corrupt or truncated safetensors"])


def test_file_pickled_weights_are_never_loaded(ws, models, prompt):
    weights = weights_file(prompt)
    torch.save({"prompt": torch.zeros(2)}, weights.with_suffix(".bin"))
    weights.unlink()
    refused([ws], *predict(prompt, models), says=[str(weights), "prompt.bin", "pickle", "never loads"])


def test_file_unknown_format_version(ws, models, prompt):
    config = json.loads((prompt / "prompt_config.json").read_text())
    config["format_version"] = 99
    (prompt / "prompt_config.json").write_text(json.dumps(config))
    refused([ws], *predict(prompt, models), says=["prompt_config.json", "'format_version' is 99"])


def test_file_invalid_json_names_line_and_column(ws, models, prompt):
    (prompt / "prompt_config.json").write_text('{\n  "format": "softprompt",\n  "method": ,\n}')
    refused([ws], *predict(prompt, models), says=["prompt_config.json", "invalid JSON at line 3, column 13"])


def test_file_unknown_config_field(ws, models, prompt):
    config = json.loads((prompt / "prompt_config.json").read_text())
    config["config"]["num_virtual_tokenz"] = 4
    (prompt / "prompt_config.json").write_text(json.dumps(config))
    refused([ws], *predict(prompt, models), says=["prompt_config.json", "num_virtual_tokenz"])


def test_file_wrong_tensor_shape(ws, models, prompt):
    tensors = sp.io.load_tensors(weights_file(prompt))
    save_file({k: torch.cat([v, v], dim=-1).contiguous() for k, v in tensors.items()}, str(weights_file(prompt)))
    refused([ws], *predict(prompt, models), says=[str(weights_file(prompt)), "shape"])


@pytest.mark.parametrize("damage", ["drop labels", "labels a number"])
def test_file_task_json_without_a_key_it_needs(ws, models, prompt, damage):
    task = json.loads((prompt / "task.json").read_text())
    if damage == "drop labels":
        del task["labels"]
    else:
        task["labels"] = 7
    (prompt / "task.json").write_text(json.dumps(task))
    words = ["missing key 'labels'"] if damage == "drop labels" else ["TypeError"]
    refused([ws], *predict(prompt, models), says=[str(prompt / "task.json"), "task head", *words])


def test_file_missing_prompt_folder(ws, models):
    refused([ws], *predict(ws / "nowhere", models), says=[str(ws / "nowhere")])


def test_file_folder_that_is_not_a_prompt(ws, models):
    (ws / "photos").mkdir()
    refused([ws], *predict(ws / "photos", models), says=["photos", "prompt_config.json"])


# -- PEFT adapters -------------------------------------------------------------------------
@pytest.fixture
def adapter(ws, models):
    """A real PEFT adapter folder, exported from a prompt-tuning prompt on tiny GPT-2."""
    run = ws / "pt"
    r = cli("train", "--model", models["gpt2"], "--method", "prompt-tuning", "--task", "classification",
            "--train", ws / "reviews.jsonl", "--eval", ws / "reviews.jsonl", "--field", "review:text",
            "--template", "[P:3] [START] {text}", "--set", "head=linear", "--output", run, *QUICK)
    assert r.exit_code == 0, r.output
    r = cli("export", run, ws / "adapter", "--model", models["gpt2"], "--without-head")  # the prompt is what is needed
    assert r.exit_code == 0, r.output
    return ws / "adapter"


def import_args(adapter: Path, models, model: str = "gpt2"):
    return ["import", adapter, adapter.parent / "imported", "--model", models[model]]


def test_peft_adapter_of_a_type_we_do_not_import(ws, models, adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused([ws], *import_args(adapter, models), says=["adapter_config.json", "'peft_type' is 'LORA'", "LoRA"])


def test_peft_adapter_for_another_kind_of_base(ws, models, adapter):
    refused([ws], *import_args(adapter, models, model="bert"),
            says=["adapter_config.json", "'task_type' is 'CAUSAL_LM'", "(bert) is not a causal LM"])


def test_peft_adapter_for_a_base_of_other_sizes(ws, models, adapter, gpt2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = ws / "wider-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=48, n_layer=3, n_head=4,
                               n_positions=64)).save_pretrained(wider)
    gpt2_tokenizer.save_pretrained(wider)
    refused([ws], "import", adapter, ws / "imported", "--model", wider,
            says=[str(adapter), "another base model", "token_dim: adapter 32, base 48", "num_layers: adapter 2, base 3"])


def test_peft_corrupt_adapter_config_names_the_field(ws, models, adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = -3
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused([ws], *import_args(adapter, models), says=["adapter_config.json", "'num_virtual_tokens'", "-3"])


def test_peft_pickled_adapter_is_never_loaded(ws, models, adapter):
    weights = adapter / "adapter_model.safetensors"
    torch.save({"prompt_embeddings": torch.zeros(3, 2)}, adapter / "adapter_model.bin")
    weights.unlink()
    refused([ws], *import_args(adapter, models), says=[str(weights), "adapter_model.bin", "pickle"])


# -- a save that fails half-way ------------------------------------------------------------
SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
import softprompt as sp
from transformers import AutoModel, AutoTokenizer
base, tok = AutoModel.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(1)
model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=64), tokenizer=tok)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # like a disk that fills up mid-write
try:
    model.save_pretrained(sys.argv[2])
except sp.SoftPromptError as e:
    print("error:", e)
    sys.exit(1)
"""


def test_file_save_that_fails_half_way_keeps_the_previous_prompt(ws, models, prompt):
    """A real write error (the file-size limit, as a full disk) in the middle of
    save_pretrained: the previous prompt stays as it was and no partial folder remains."""
    before = tree(ws)
    r = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_FILE_SIZE_LIMIT, str(models["bert"]), str(prompt)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and "File too large" in r.stdout and str(prompt) in r.stdout, (r.stdout, r.stderr)
    assert not changes(before, tree(ws)), changes(before, tree(ws))
    assert cli(*predict(prompt, models)).exit_code == 0


# -- the matrix in docs/RELIABILITY.md -----------------------------------------------------
def test_reliability_doc_lists_exactly_these_cases():
    documented = set(re.findall(r"`(test_[a-z0-9_]+)`", (ROOT / "docs" / "RELIABILITY.md").read_text()))
    here = {name for name in globals() if name.startswith("test_") and name != "test_reliability_doc_lists_exactly_these_cases"}
    assert here <= documented, f"not in docs/RELIABILITY.md: {sorted(here - documented)}"
