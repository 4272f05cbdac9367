"""Experiment trackers (``train.report_to``): each one, run offline against its own files, holds
the values metrics.jsonl holds; a typo or a missing package is refused before the model loads."""

from __future__ import annotations

import glob
import json
import re
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import softprompt as sp
from softprompt.errors import ConfigError, TrainingError
from softprompt.extras import MissingExtraError
from softprompt.tasks import SequenceClassification
from softprompt.training import run as run_module
from softprompt.training.config import RunConfig, TrainConfig, load_yaml, to_yaml
from softprompt.training.logs import RunLog, tracker_parameters
from softprompt.training.loop import train as train_loop

from conftest import make_bert
from test_cli_train import bert_dir, invoke, reviews  # noqa: F401 (fixtures)

STEPS, EVERY = 6, 2


@pytest.fixture
def no_model(monkeypatch):
    """`softprompt train` fails loudly if it gets as far as loading the base model."""
    def load_base(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_base", load_base)


def run(bert_dir, reviews, out: Path, report_to, **train):
    """A tiny run (6 steps, dev metrics every 2) reporting to `report_to`; its metrics.jsonl rows."""
    sp.train(model=str(bert_dir), task="classification", train_file=str(reviews), eval_file=str(reviews),
             fields=["review:text"], output=str(out), num_virtual_tokens=2,
             train={"steps": STEPS, "eval_every": EVERY, "batch_size": 4, "lr": 0.1, "head_lr": 0.1,
                    "progress": False, "report_to": report_to, **train})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    return rows


def expected_parameters(out: Path) -> dict:
    """What every tracker must record as the run's parameters: config.json, flat."""
    params = tracker_parameters(json.loads((out / "config.json").read_text()))
    assert params["train.report_to"] and params["train.lr"] == 0.1 and params["task"] == "classification"
    assert params["fields"] == '["review:text"]'  # a list, as JSON text
    return params


# -- the setting ------------------------------------------------------------------------------
def test_report_to_takes_a_list_or_commas_and_one_spelling_goes_to_config_files(tmp_path, bert_dir):
    r = invoke("train", "--model", bert_dir, "--task", "classification", "--print-config",
               "--set", "train.report_to=[TensorBoard, mlflow]", "--set", "train.project=sweep-3")
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["report_to"] == "tensorboard,mlflow" and printed["train"]["project"] == "sweep-3"
    (tmp_path / "run.yaml").write_text(r.stdout)
    replayed = RunConfig()
    load_yaml(tmp_path / "run.yaml", replayed)
    replayed.validate()
    assert replayed.train.trackers == ["tensorboard", "mlflow"] and to_yaml(replayed) == r.stdout
    default = invoke("train", "--model", bert_dir, "--task", "classification", "--print-config")
    assert yaml.safe_load(default.stdout)["train"]["report_to"] == "none"


@pytest.mark.parametrize("value, match", [
    ("wandbb", r"unknown tracker 'wandbb'; did you mean 'wandb'\?"),
    ("tensorbaord,mlflow", r"unknown tracker 'tensorbaord'; did you mean 'tensorboard'\?"),
    ("none,comet", "'none' cannot be combined"),
    ("7", "must be none or tracker names"),
])
def test_a_bad_tracker_is_refused_before_the_model_loads(bert_dir, reviews, tmp_path, no_model, value, match):
    r = invoke("train", "--model", bert_dir, "--task", "classification", "--train", reviews,
               "--field", "review:text", "--output", tmp_path / "run", "--set", f"train.report_to={value}")
    assert r.exit_code == 1 and "the model was loaded" not in r.output
    assert r.output.startswith("error: ") and re.search(match, r.output), r.output
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_names_its_extra_before_the_model_loads(bert_dir, reviews, tmp_path, no_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of it fails, as when not installed
    r = invoke("train", "--model", bert_dir, "--task", "classification", "--train", reviews,
               "--field", "review:text", "--output", tmp_path / "run", "--set", "train.report_to=tensorboard,wandb")
    assert r.exit_code == 1, r.output
    assert "train.report_to=wandb needs the 'wandb' package: pip install 'softprompt[wandb]'" in r.output
    with pytest.raises(MissingExtraError, match=r"softprompt\[wandb\]"):  # the Python loop checks too
        train_loop(None, None, [], None, TrainConfig(report_to="wandb"), tmp_path)
    monkeypatch.setitem(sys.modules, "comet_ml", None)
    with pytest.raises(MissingExtraError, match="report_to=comet needs the 'comet_ml' package: pip install comet-ml"):
        train_loop(None, None, [], None, TrainConfig(report_to="comet"), tmp_path)


def test_an_mlflow_store_that_cannot_open_is_named_before_the_model_loads(bert_dir, reviews, tmp_path, no_model,
                                                                          monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(ConfigError, match="train.report_to=mlflow: MLflow's tracking store 'nosuchscheme://nowhere'"):
        run(bert_dir, reviews, tmp_path / "run", "mlflow")


def test_the_old_tensorboard_switch_still_loads(tmp_path):
    """Run files and run folders from before `report_to` (``train.tensorboard: true``)."""
    (tmp_path / "old.yaml").write_text("train:\n  tensorboard: true\n  lr: 0.3\n")
    config = RunConfig()
    load_yaml(tmp_path / "old.yaml", config)
    config.validate()
    assert config.train.report_to == "tensorboard" and config.train.lr == 0.3
    resumed = RunConfig.from_dict({"model": "minilm", "train": {"tensorboard": False, "steps": 9}})
    resumed.validate()
    assert resumed.train.report_to == "none" and resumed.train.steps == 9


def test_only_the_main_process_tracks(tmp_path):
    class OtherProcess:
        is_main_process = False

        def __getattr__(self, name):
            raise AssertionError(f"a non-main process called accelerator.{name}")

    logs = RunLog(tmp_path, TrainConfig(report_to="tensorboard,wandb", progress=False), 0, OtherProcess())
    logs.loss(type("State", (), {"losses": [], "best_metric": None})(), 1, 0.5, 10)
    logs.close()
    assert logs.tracker is None and not any(tmp_path.iterdir())


# -- each tracker, read back from its own files -------------------------------------------------
def test_tensorboard_holds_the_metrics_lines_and_each_step_s_loss(bert_dir, reviews, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = run(bert_dir, reviews, out, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard" / "softprompt"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    for row in rows:
        for key, value in row.items():
            if key != "step":  # TensorBoard keeps float32
                assert scalars[key][row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    losses = scalars["train/loss"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for row in rows:  # a metrics line's train_loss is the mean of its window's step losses
        window = [losses[s] for s in range(row["step"] - EVERY + 1, row["step"] + 1)]
        assert sum(window) / EVERY == pytest.approx(row["train_loss"], rel=1e-5)
    (hparams,) = glob.glob(str(out / "tensorboard" / "softprompt" / "*" / "hparams.yml"))
    assert yaml.safe_load(Path(hparams).read_text()) == expected_parameters(out)


def test_mlflow_file_store_holds_the_metrics_lines(bert_dir, reviews, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store without it
    out = tmp_path / "sst2-run"
    rows = run(bert_dir, reviews, out, "mlflow", project="softprompt-tests")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("softprompt-tests")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "sst2-run" and found.info.status == "FINISHED"
    assert found.data.params == {k: str(v) for k, v in expected_parameters(out).items()}
    for key in rows[0]:
        if key != "step":
            history = client.get_metric_history(found.info.run_id, key)
            assert [(m.step, m.value) for m in history] == [(r["step"], float(r[key])) for r in rows], key
    losses = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in losses] == list(range(1, STEPS + 1))


def test_mlflow_run_ends_when_the_training_stops(tmp_path, monkeypatch, wordpiece_tokenizer):
    """A run stopped by a non-finite loss ends its MLflow run (an active one would refuse the
    next run in this process), and the next run starts."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data = [{"text": t, "label": lab} for t, lab in [("great fun", "pos"), ("boring", "neg")] * 4]
    original = SequenceClassification.loss
    calls = {"n": 0}

    def exploding(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    def fresh():
        torch.manual_seed(0)
        return (sp.SoftPromptModel(make_bert(wordpiece_tokenizer), sp.PTuningV2Config(num_virtual_tokens=2),
                                   tokenizer=wordpiece_tokenizer), SequenceClassification(["neg", "pos"]))

    config = TrainConfig(steps=4, batch_size=4, eval_every=2, progress=False, report_to="mlflow", project="stops")
    monkeypatch.setattr(SequenceClassification, "loss", exploding)
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_loop(*fresh(), data, data, config, tmp_path / "a")
    monkeypatch.setattr(SequenceClassification, "loss", original)
    assert mlflow.active_run() is None
    train_loop(*fresh(), data, data, config, tmp_path / "b")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("stops").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"] and {r.info.status for r in runs} == {"FINISHED"}
    assert {k for k in runs[0].data.params if k.startswith("train.")} >= {"train.lr", "train.report_to"}


def _wandb_records(path: Path):
    """The records of an offline W&B run file (``run-<id>.wandb``): wandb 0.19+ writes it from
    its Go core and ships no Python reader, so this reads the format itself: a 7-byte header
    (":W&B", magic, version), then LevelDB-log chunks (crc32 4 bytes, length 2, type 1: full,
    first, middle, last) in 32 KiB blocks, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_lines(bert_dir, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "wb-run"
    rows = run(bert_dir, reviews, out, "wandb", project="softprompt-tests")
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))  # in the run folder
    history: dict[int, dict] = {}
    config, run_record = {}, None
    for record in _wandb_records(Path(path)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update if not i.key.startswith("_")}
        elif kind == "run":
            run_record = record.run
    assert run_record.project == "softprompt-tests" and run_record.display_name == "wb-run"
    for row in rows:
        assert {k: history[row["step"]][k] for k in row if k != "step"} == {k: v for k, v in row.items() if k != "step"}
    assert sorted(s for s, h in history.items() if "train/loss" in h) == list(range(1, STEPS + 1))
    assert config == expected_parameters(out)


def test_comet_offline_archive_holds_the_metrics_lines(bert_dir, reviews, tmp_path, monkeypatch):
    pytest.importorskip("comet_ml")  # in no extra (see logs.BY_HAND): runs where it was installed by hand
    monkeypatch.setenv("COMET_START_ONLINE", "false")  # comet_ml.start(): an OfflineExperiment
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    # Read when comet_ml is first imported (here by the run's tracker check, unless transformers
    # imported it earlier in this process): no import hooks, no error reports sent.
    monkeypatch.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")
    out = tmp_path / "cm-run"
    rows = run(bert_dir, reviews, out, "comet")
    (archive,) = glob.glob(str(tmp_path / "comet" / "*.zip"))
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines() if line.strip()]
        assert json.loads(z.read("experiment.json"))["project_name"] == "softprompt"
    metrics: dict[str, dict[int, float]] = {}
    params, others = {}, {}
    for m in messages:
        if m["type"] == "log_other":
            others[m["payload"]["key"]] = m["payload"]["value"]
        elif m["type"] == "metric_msg":
            metrics.setdefault(m["payload"]["metric"]["metricName"], {})[m["payload"]["metric"]["step"]] = \
                m["payload"]["metric"]["metricValue"]
        elif m["type"] == "parameter_msg":
            params[m["payload"]["param"]["paramName"]] = m["payload"]["param"]["paramValue"]
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert float(metrics[key][row["step"]]) == pytest.approx(value, rel=1e-9), key
    assert sorted(metrics["train/loss"]) == list(range(1, STEPS + 1))
    assert others["Name"] == "cm-run"
    assert {k: str(v) for k, v in params.items() if k in ("train.lr", "train.report_to", "task")} == \
        {"train.lr": "0.1", "train.report_to": "comet", "task": "classification"}
