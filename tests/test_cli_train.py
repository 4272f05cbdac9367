"""`softprompt train / eval / predict` end to end, as a user runs them (tiny local models)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from softprompt.cli import app

from conftest import make_bert, make_gpt2

runner = CliRunner()
POS = ["a gem of a film", "wonderful acting", "great fun", "a delight", "moving and funny", "superb"]
NEG = ["a dull mess", "terrible plot", "boring", "a waste of time", "awful dialogue", "tedious"]


@pytest.fixture
def bert_dir(wordpiece_tokenizer, tmp_path):
    path = tmp_path / "tiny-bert"
    make_bert(wordpiece_tokenizer).bert.save_pretrained(path)  # a bare encoder, as MiniLM
    wordpiece_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def gpt2_dir(gpt2_tokenizer, tmp_path):
    path = tmp_path / "tiny-gpt2"
    make_gpt2(gpt2_tokenizer).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def reviews(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"review": t, "label": "pos"} for t in POS] + [{"review": t, "label": "neg"} for t in NEG]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def last_json(output: str):
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_train_eval_predict_on_user_files(bert_dir, reviews, tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "p-tuning-v2", "--task", "classification",
               "--train", reviews, "--eval", reviews, "--field", "review:text", "--output", out,
               "--set", "train.steps=30", "--set", "train.eval_every=10", "--set", "train.batch_size=4",
               "--set", "train.lr=0.1", "--set", "train.head_lr=0.1", "--set", "train.progress=false", "-P", "4")
    assert r.exit_code == 0, r.output
    summary = last_json(r.stdout)
    assert summary["best"]["accuracy"] >= 0.9 and summary["steps"] == 30
    config = json.loads((out / "config.json").read_text())
    assert config["template"] == "{text}" and config["num_virtual_tokens"] == 4
    assert config["train"]["lr"] == 0.1

    r = invoke("eval", "--prompt", out, "--data", reviews, "--model", bert_dir)
    assert r.exit_code == 1 and "'text'" in r.output  # these rows have 'review', not the template's 'text'
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "pos"}) + "\n" for t in POS)
                    + "".join(json.dumps({"text": t, "label": "neg"}) + "\n" for t in NEG))
    r = invoke("eval", "--prompt", out, "--data", data, "--model", bert_dir)
    assert r.exit_code == 0, r.output
    assert last_json(r.stdout)["accuracy"] == summary["best"]["accuracy"]

    r = invoke("predict", "--prompt", out, "--model", bert_dir, "a gem of a film", "tedious")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["prediction"]["label"] for x in lines] == ["pos", "neg"]
    assert abs(sum(lines[0]["prediction"]["scores"].values()) - 1) < 1e-5


def test_existing_run_is_refused_then_resumed(bert_dir, reviews, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--model", bert_dir, "--task", "classification", "--train", reviews, "--eval", reviews,
              "--field", "review:text", "--output", out, "--set", "train.steps=6", "--set", "train.eval_every=3",
              "--set", "train.progress=false", "-P", "2"]
    assert invoke(*common).exit_code == 0
    r = invoke(*common)
    assert r.exit_code == 1 and "already holds a run; pass --resume" in r.output
    r = invoke("train", "--output", out, "--resume")
    assert r.exit_code == 0, r.output
    assert invoke(*common, "--overwrite").exit_code == 0


def test_only_the_main_process_refuses_a_folder_holding_a_run(tmp_path, monkeypatch):
    """The other processes of a distributed run may check the folder after the main one
    wrote this run's config.json: they leave the refusal to it (a race seen in CI)."""
    from softprompt.errors import TrainingError
    from softprompt.training.config import RunConfig
    from softprompt.training.run import CONFIG, _check_output

    (tmp_path / CONFIG).write_text("{}")
    cfg = RunConfig(output=str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert _check_output(cfg, resume=False, overwrite=False) == tmp_path
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainingError, match="already holds a run"):
        _check_output(cfg, resume=False, overwrite=False)


def test_recipe_on_real_data_with_a_causal_lm_verbalizer(gpt2_dir, tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--model", gpt2_dir, "--method", "p-tuning", "--task", "sst2", "--output", out,
               "--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "train.batch_size=4",
               "--set", "train.progress=false", "--set", "train.eval_batch_size=128")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["resolved_task"] == "verbalizer" and "[P:" in config["template"] and "[MASK]" in config["template"]
    metrics = last_json(r.stdout)
    # the held-out protocol: selected on 1,000 rows held out of train, reported on GLUE dev (872), never selected on
    assert metrics["best"]["n"] == 1000 and metrics["test"]["n"] == 872
    assert metrics["selected_on"] == "dev: 1000 rows held out of the training split (seed 0)"
    assert metrics["reported_on"] == "test: the sst2 recipe's sst2/dev.tsv"
    saved = json.loads((out / "metrics.json").read_text())
    assert (saved["selected_on"], saved["reported_on"]) == (metrics["selected_on"], metrics["reported_on"])


@pytest.mark.parametrize("args,message", [
    (["--task", "sst3"], "sst2"),
    (["--set", "train.lrr=1"], "did you mean 'train.lr'"),
    (["--method", "lora"], "unknown method 'lora'"),
])
def test_bad_input_is_one_error_line(bert_dir, tmp_path, args, message):
    task = [] if "--task" in args else ["--task", "sst2"]
    r = invoke("train", "--model", bert_dir, *task, "--output", tmp_path / "x", "--set", "train.steps=1", *args)
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output


def test_model_and_task_are_required_unless_a_config_sets_them(bert_dir, tmp_path):
    """`softprompt train -o x` alone trained the SST-2 demo on MiniLM: now --model and
    --task are required, unless --config (or --set) gives them."""
    for args, missing in [(["-o", tmp_path / "x"], "--model"), (["--model", bert_dir, "-o", tmp_path / "x"], "--task")]:
        r = invoke("train", *args)
        assert r.exit_code == 2 and f"{missing} is required" in r.output, r.output
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {bert_dir}\ntask: sst2\n")
    r = invoke("train", "--config", run, "--print-config")
    assert r.exit_code == 0 and "task: sst2" in r.stdout
    r = invoke("train", "--set", f"model={bert_dir}", "--set", "task=sst2", "--print-config")
    assert r.exit_code == 0, r.output


def test_eval_zero_shot_is_the_base_model_with_the_manual_template(gpt2_dir, reviews, tmp_path):
    """--zero-shot: no trained vectors; predictions are the base model's label-word argmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = invoke("eval", "--zero-shot", "--model", gpt2_dir, "--data", reviews, "--labels", "pos:great",
               "--labels", "neg:terrible", "--template", "Review: {review} Sentiment: [MASK]")
    assert r.exit_code == 0, r.output
    got = last_json(r.stdout)
    base, tok = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), AutoTokenizer.from_pretrained(gpt2_dir)
    great, terrible = tok.encode(" great"), tok.encode(" terrible")
    assert len(great) == len(terrible) == 1
    correct = 0
    for row in [json.loads(x) for x in reviews.read_text().splitlines()]:
        ids = tok.encode(f"Review: {row['review']} Sentiment:", return_tensors="pt")
        with torch.no_grad():
            last = base(ids).logits[0, -1]
        predicted = "pos" if last[great[0]] > last[terrible[0]] else "neg"
        correct += predicted == row["label"]
    assert got["accuracy"] == pytest.approx(correct / 12) and got["n"] == 12
    assert got["template"] == "Review: {review} Sentiment: [MASK]"


def test_eval_zero_shot_refuses_what_it_cannot_do(gpt2_dir, reviews, tmp_path):
    r = invoke("eval", "--zero-shot", "--model", gpt2_dir, "--data", reviews, "--labels", "pos:great",
               "--labels", "neg:terrible", "--template", "[P:2] {review} [MASK]")
    assert r.exit_code == 1 and "no virtual tokens" in r.stderr
    r = invoke("eval", "--zero-shot", "--model", gpt2_dir, "--data", reviews, "--labels", "pos", "--labels", "neg",
               "--template", "{review} [MASK]")
    assert r.exit_code == 1 and "label words" in r.stderr
    r = invoke("eval", "--zero-shot", "--prompt", tmp_path, "--model", gpt2_dir, "--task", "sst2")
    assert r.exit_code == 1 and "drop --prompt" in r.stderr
    r = invoke("eval")
    assert r.exit_code == 1 and "--prompt" in r.stderr


def test_train_scores_the_best_prompt_on_the_test_file(bert_dir, reviews, tmp_path):
    """--test: the prompt selected on --eval is scored on --test at the end (metrics.json 'test')."""
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"review": t, "label": "pos"}) + "\n" for t in POS[:2])
                    + "".join(json.dumps({"review": t, "label": "neg"}) + "\n" for t in NEG[:3]))
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "prompt-tuning", "--task", "classification",
               "--train", reviews, "--eval", reviews, "--test", test, "--field", "review:text", "--output", out,
               "--set", "train.steps=12", "--set", "train.eval_every=4", "--set", "train.batch_size=4",
               "--set", "train.lr=0.1", "--set", "train.head_lr=0.1", "--set", "train.progress=false", "-P", "2")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["test"]["n"] == 5 and last_json(r.stdout)["test"] == summary["test"]
    r = invoke("eval", "--prompt", out, "--data", test, "--field", "review:text", "--model", bert_dir)
    assert r.exit_code == 0, r.output
    assert last_json(r.stdout)["accuracy"] == summary["test"]["accuracy"]


def test_labels_of_other_json_types_are_one_label(bert_dir, tmp_path):
    """Labels compare as strings: 1 in the training file and "1" in the dev file are one
    label (so are true and "true"), and the run scores them so."""
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in POS)
                     + "".join(json.dumps({"text": t, "label": 0.0}) + "\n" for t in NEG))
    dev.write_text("".join(json.dumps({"text": t, "label": "1"}) + "\n" for t in POS)
                   + "".join(json.dumps({"text": t, "label": "0"}) + "\n" for t in NEG))
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "p-tuning-v2", "--task", "classification", "--train", train,
               "--eval", dev, "--output", out, "--set", "train.steps=30", "--set", "train.eval_every=10",
               "--set", "train.batch_size=4", "--set", "train.lr=0.1", "--set", "train.head_lr=0.1",
               "--set", "train.progress=false", "-P", "4")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "prompt" / "task.json").read_text())["labels"] == ["0", "1"]
    assert last_json(r.stdout)["best"]["accuracy"] >= 0.9


def test_a_failed_start_in_a_folder_that_was_there_removes_only_its_own_files(bert_dir, reviews, tmp_path,
                                                                              monkeypatch):
    """A new run that fails in its first step, in a folder the user made: the folder and
    what else it holds stay; config.json (and whatever else the run wrote) goes."""
    from softprompt.errors import TrainingError
    from softprompt.training.loop import Loop

    def fail(self):
        raise TrainingError("the first step failed")

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(Loop, "forward_backward", fail)
    r = invoke("train", "--model", bert_dir, "--task", "classification", "--train", reviews, "--eval", reviews,
               "--field", "review:text", "--output", out, "--set", "train.steps=2", "--set", "train.progress=false")
    assert r.exit_code == 1 and "the first step failed" in r.stderr, r.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_train_from_python_equals_the_cli(bert_dir, reviews, tmp_path):
    """`softprompt.train(...)`: the CLI's run from Python, the same keys (sections as
    dicts), the same run folder and metrics; an unknown key refused with the closest one."""
    import softprompt as sp

    common = dict(model=str(bert_dir), method="p-tuning-v2", task="classification", train_file=str(reviews),
                  eval_file=str(reviews), fields=["review:text"], num_virtual_tokens=4)
    steps = {"steps": 12, "eval_every": 6, "batch_size": 4, "lr": 0.1, "head_lr": 0.1, "progress": False}
    result = sp.train(output=str(tmp_path / "py"), train=steps, **common)
    r = invoke("train", "--model", bert_dir, "--method", "p-tuning-v2", "--task", "classification", "--train", reviews,
               "--eval", reviews, "--field", "review:text", "--output", tmp_path / "cli", "-P", "4",
               *[a for k, v in steps.items() for a in ("--set", f"train.{k}={str(v).lower()}")])
    assert r.exit_code == 0, r.output
    assert result.steps == 12 and result.best_metric == last_json(r.stdout)["best"]["accuracy"]
    def without_clock(value):  # the runs are bit-identical on the CPU, their wall-clock times are not
        if isinstance(value, dict):
            return {k: without_clock(v) for k, v in value.items() if "second" not in k and "per_s" not in k}
        return value

    for name in ("config.json", "metrics.json"):
        py, cli = (without_clock(json.loads((tmp_path / run / name).read_text())) for run in ("py", "cli"))
        for differ in ("output", "data_root"):  # the CLI records $SOFTPROMPT_DATA; None resolves to it too
            py.pop(differ, None), cli.pop(differ, None)
        assert py == cli, name
    with pytest.raises(sp.ConfigError, match="train.lrr.*did you mean 'train.lr'"):
        sp.train(output=str(tmp_path / "bad"), train={"lrr": 0.1}, **common)
    assert not (tmp_path / "bad").exists()


def test_export_refuses_to_drop_a_trained_head(bert_dir, reviews, tmp_path):
    """A run with a linear head: `export --to peft` refuses (the adapter would predict
    without the head) and names --without-head, which exports the prompt alone."""
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "p-tuning-v2", "--task", "classification", "--train", reviews,
               "--eval", reviews, "--field", "review:text", "--output", out, "-P", "2", "--set", "train.steps=2",
               "--set", "train.progress=false")
    assert r.exit_code == 0, r.output
    assert (out / "prompt" / "head.safetensors").is_file()
    r = invoke("export", out, tmp_path / "adapter")
    assert r.exit_code == 1 and "holds a trained task head (head.safetensors)" in r.output and "--without-head" in r.output
    assert not (tmp_path / "adapter").exists()
    r = invoke("export", out, tmp_path / "adapter", "--without-head")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


def test_a_run_replays_from_its_own_config_and_print_config(bert_dir, reviews, tmp_path):
    """`--config RUN/config.json` (or RUN/config.yaml) as it is trains the same run again (the recorded
    `resolved_task` / `data` ignored); `--print-config` prints the whole configuration as
    YAML that `--config` reads back to the same; a misspelt task key is refused with the
    closest one before the model loads."""
    first = tmp_path / "first"
    r = invoke("train", "--model", bert_dir, "--method", "p-tuning-v2", "--task", "classification", "--train", reviews,
               "--eval", reviews, "--field", "review:text", "--output", first, "-P", "2", "--set", "train.steps=4",
               "--set", "train.eval_every=2", "--set", "train.progress=false", "--set", "task.pool=mean")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--config", first / "config.json", "--output", tmp_path / "again")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--config", first / "config.yaml", "--output", tmp_path / "from-yaml")  # the same, as YAML
    assert r.exit_code == 0, r.output
    recorded = [json.loads((tmp_path / run / "config.json").read_text()) for run in ("first", "again", "from-yaml")]
    for c in recorded:
        c.pop("output")
    assert recorded[0] == recorded[1] == recorded[2] and recorded[0]["task_options"] == {"pool": "mean"}
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["best"]["accuracy"] == \
        json.loads((first / "metrics.json").read_text())["best"]["accuracy"]

    r = invoke("train", "--config", first / "config.json", "--print-config", "--set", "train.lr=0.05")
    assert r.exit_code == 0, r.output
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout)
    r2 = invoke("train", "--config", printed, "--print-config")
    assert r2.exit_code == 0 and r2.stdout == r.stdout and "lr: 0.05" in r.stdout
    assert not (tmp_path / "printed").exists()  # nothing trained

    r = invoke("train", "--model", "no-such-model", "--task", "classification", "--train", reviews, "--eval", reviews,
               "--field", "review:text", "--output", tmp_path / "bad", "--set", "task.pooll=mean")
    assert r.exit_code == 1 and "unknown key 'task.pooll' for a classification task; did you mean 'task.pool'?" in r.output


def test_predict_a_file_with_renamed_columns_into_an_output_file(bert_dir, reviews, tmp_path):
    """`predict --input FILE --field COLUMN:FIELD --output OUT`: every row predicted, written
    to OUT (one JSON line each, the same as stdout gives), a progress bar on stderr."""
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "p-tuning-v2", "--task", "classification", "--train", reviews,
               "--eval", reviews, "--field", "review:text", "--output", out, "-P", "2", "--set", "train.steps=2",
               "--set", "train.progress=false")
    assert r.exit_code == 0, r.output
    r = invoke("predict", "--prompt", out, "--input", reviews, "--field", "review:text", "--output", tmp_path / "p.jsonl")
    assert r.exit_code == 0, r.output
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [w["input"]["text"] for w in written] == POS + NEG and "12 predictions written" in r.output
    r = invoke("predict", "--prompt", out, *POS, *NEG)
    assert [json.loads(line)["prediction"] for line in r.stdout.splitlines()] == [w["prediction"] for w in written]
    r = invoke("predict", "--prompt", out, "--input", reviews, "--output", tmp_path / "q.jsonl")
    assert r.exit_code == 1 and "'text'" in r.output and not (tmp_path / "q.jsonl").exists()  # no column named text


EXAMPLES = sorted((__import__("pathlib").Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_run_files_are_valid_and_round_trip(example, tmp_path):
    """Each `examples/configs/*.yaml` is a valid run file: its keys known, its method's
    prompt keys checked, and `--print-config` of it reads back to the same."""
    r = invoke("train", "--config", example, "--print-config")
    assert r.exit_code == 0, r.output
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout)
    assert invoke("train", "--config", printed, "--print-config").stdout == r.stdout
    import yaml

    given = yaml.safe_load(example.read_text())
    resolved = yaml.safe_load(r.stdout)
    for key, value in given.items():
        if isinstance(value, dict):
            section = resolved["task_options" if key == "task_options" else key]
            assert all(section[k] == v for k, v in value.items()), key
        else:
            assert resolved[key] == value, key


@pytest.mark.slow
def test_the_own_data_example_trains(tmp_path, monkeypatch):
    """The run file for one's own data trains as written (real MiniLM; 2 steps)."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"review": t, "label": "pos"}) + "\n" for t in POS)
                                     + "".join(json.dumps({"review": t, "label": "neg"}) + "\n" for t in NEG))
    example = [e for e in EXAMPLES if e.stem == "classification-own-data"][0]
    r = invoke("train", "--config", example, "--set", "train.steps=2", "--set", "train.progress=false")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())["task_options"] == {"pool": "mean"}


def test_train_and_test_files_alone_select_on_rows_held_out_of_train(bert_dir, tmp_path):
    """`--train` and `--test` without `--eval`: the best prompt is chosen on rows held out
    of the training file (seeded: the same rows for the same seed), the test file reported."""
    from softprompt.training.assemble import load_data
    from softprompt.training.config import RunConfig

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    rows = [{"review": f"{w} film number {i}", "label": lab} for i in range(30)
            for w, lab in (("a great", "pos"), ("a dull", "neg"))]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    out = tmp_path / "run"
    r = invoke("train", "--model", bert_dir, "--method", "prompt-tuning", "--task", "classification", "--train", train,
               "--test", test, "--field", "review:text", "--output", out, "--set", "train.steps=2",
               "--set", "train.eval_every=0", "--set", "train.batch_size=4", "--set", "train.progress=false",
               "--set", "dev_holdout=5")
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["n"] == 5 and metrics["test"]["n"] == 8
    assert metrics["selected_on"] == "dev: 5 rows held out of the training split (seed 0)"
    cfg = dict(task="classification", train_file=str(train), test_file=str(test), fields=["review:text"],
               dev_holdout=5)
    first, again = load_data(RunConfig(**cfg)), load_data(RunConfig(**cfg))
    assert first.dev == again.dev and len(first.train) == 55 and not any(e in first.train for e in first.dev)
    other = RunConfig(**cfg)
    other.train.seed = 1
    assert load_data(other).dev != first.dev


def test_too_few_training_rows_to_hold_out_a_dev_split_is_one_clear_error(bert_dir, reviews, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(reviews.read_text().splitlines(keepends=True)[:5]))
    r = invoke("train", "--model", bert_dir, "--task", "classification", "--train", small, "--test", reviews,
               "--field", "review:text", "--output", tmp_path / "x", "--set", "train.steps=1")
    assert r.exit_code == 1
    assert "5 training rows are too few to hold out a dev split" in r.output and "--eval FILE" in r.output


def test_dept_trains_evaluates_predicts_and_shows_in_info(gpt2_dir, reviews, tmp_path):
    """DePT from the CLI: the prompt and the low-rank pair train at their own rates (train.lr,
    train.delta_lr), the run's prompt folder holds the delta, and eval / predict / info read it."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    r = invoke("train", "--model", gpt2_dir, "--method", "dept", "--task", "classification",
               "--train", reviews, "--eval", reviews, "--field", "review:text", "--labels", "pos:great",
               "--labels", "neg:terrible", "--output", out, "-P", "3",
               "--set", "prompt.rank=4", "--set", "prompt.max_input_length=16", "--set", "train.steps=8",
               "--set", "train.eval_every=4", "--set", "train.batch_size=4", "--set", "train.lr=0.1",
               "--set", "train.delta_lr=0.01", "--set", "train.progress=false")
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "dept" and config["train"]["delta_lr"] == 0.01 and config["template"].startswith("[P:3]")
    saved = json.loads((out / "prompt" / "prompt_config.json").read_text())
    assert saved["input_delta_shape"] == [16, 32] and saved["config"]["rank"] == 4
    assert "lr 0.1, head_lr 0.005" in (out / "prompt" / "README.md").read_text()  # the model card's
    assert "delta_lr 0.01 |" in (out / "prompt" / "README.md").read_text()  # training row has both rates
    delta = load_file(out / "prompt" / "prompt.safetensors")["input_delta"]
    assert delta.abs().max() > 0  # B moved off zero: the pair trained

    r = invoke("eval", "--prompt", out, "--data", reviews, "--field", "review:text", "--model", gpt2_dir)
    assert r.exit_code == 0, r.output
    assert last_json(r.stdout)["accuracy"] == json.loads((out / "metrics.json").read_text())["best"]["accuracy"]
    r = invoke("predict", "--prompt", out, "--model", gpt2_dir, "a gem of a film")
    assert r.exit_code == 0, r.output
    assert json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][0])["prediction"]["label"] in ("pos", "neg")
    r = invoke("info", out / "prompt")
    assert r.exit_code == 0, r.output
    assert "method:" in r.output and "dept" in r.output and "input delta shape: [16, 32]" in " ".join(r.output.split())
