"""Crash safety under kill -9: a training run killed anywhere resumes to the very weights of
an uninterrupted run, and a killed save never leaves a half-written prompt in sight.

Every kill is a real SIGKILL of a real process: `crash_child.py` runs the real
`softprompt train` command line in-process (a tiny random BERT saved to a folder, a user's
jsonl file, the CPU) with one of our functions wrapped (never the base model) to report the
point it reached through a marker file and wait there; the test waits for the marker,
checks the point, and kills. Then it types what a user would, ``softprompt train --output RUN
--resume``, as a subprocess, and compares the result with an uninterrupted run of the same
command: every tensor of the best prompt and of the checkpoint (prompt, head, AdamW moments
and step counts, RNG state) with `torch.equal`, the metrics rows and the final summary
(wall-clock fields aside), and the directory listing, hidden names included.

The kill points: mid-step (the backward of step 7 running; checkpoint at 5), mid-evaluation
(the step-10 evaluation after its first batch), mid-checkpoint-write (the step-10
checkpoint's temporary folder holding state.safetensors only), and, in one run killed
twice, mid-append of a metrics.jsonl row and just before the final curves.png rename. And
`save_pretrained` killed in its second save over an existing prompt folder. A kill -9 runs
no clean-up, so the dead writer's hidden temporary folder stays until the next save in the
same parent (or `--resume`) removes it; `ls` never shows it.

The uninterrupted reference run and every first killed process start together, at the
start of the module: each spends most of its time importing torch and transformers, so
side by side they take about half the wall time on 2 cores. All runs use one thread
(OMP_NUM_THREADS=1): the comparison needs the same thread count in every process, as a
user's machine gives, and one thread keeps the processes from oversubscribing the cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import softprompt as sp
import softprompt.io.atomic as spio
from softprompt.io.prompt import read_config

from conftest import make_bert

CHILD = Path(__file__).resolve().parent / "crash_child.py"
POS = ["a gem of a film", "wonderful acting", "great fun", "a delight", "moving and funny", "superb"]
NEG = ["a dull mess", "terrible plot", "boring", "a waste of time", "awful dialogue", "tedious"]
EVAL_STEPS = [5, 10, 15]  # train.steps=15, train.eval_every=5
TIMING = {"train_seconds", "tokens_per_s"}  # wall-clock: differ between any two runs
MARKER_TIMEOUT_S = 240  # six processes start at once on 2 cores
RUN_TIMEOUT_S = 300
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "CRASH_CHILD_PARENT": str(os.getpid())}  # a blocked child exits if this process dies first
# Where each first killed process stops (see crash_child.py). evaluate:2:2 and checkpoint:2
# are the step-10 evaluation and checkpoint; append:2 is the step-10 metrics row.
KILLS = {"step": "backward:7", "evaluate": "evaluate:2:2", "checkpoint": "checkpoint:2", "append": "append:2"}


# -- processes ------------------------------------------------------------------------
class Process:
    """A child process with its output in a log file, killed by pid if a test leaves it running."""

    def __init__(self, args: list, log: Path, marker: Path | None = None):
        self.log, self.marker = log, marker
        with open(log, "w") as out:
            self.popen = subprocess.Popen([sys.executable, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                          env=ENV, cwd=log.parent)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait(self) -> str:
        """Wait for a normal end (exit status 0); its output."""
        try:
            rc = self.popen.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.log.name}: still running after {RUN_TIMEOUT_S} s:\n{self.output()}")
        assert rc == 0, f"{self.log.name}: exit status {rc}:\n{self.output()}"
        return self.log.read_text()

    def kill_at_marker(self) -> dict:
        """Wait until the child reports its point, SIGKILL it there; the marker's content."""
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while not self.marker.exists():
            if self.popen.poll() is not None:
                pytest.fail(f"{self.log.name}: exited with {self.popen.returncode} before its kill point:\n"
                            f"{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.log.name}: no marker after {MARKER_TIMEOUT_S} s:\n{self.output()}")
            time.sleep(0.05)  # polling for the marker, not synchronising on time
        where = json.loads(self.marker.read_text())
        assert where["pid"] == self.popen.pid
        os.kill(self.popen.pid, signal.SIGKILL)
        assert self.popen.wait(timeout=60) == -signal.SIGKILL, self.output()
        return where

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


class Runs:
    """The module's processes: the reference run and the first killed process of each test."""

    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data = root, model, data
        self.processes: dict[str, Process] = {}

    def train_args(self, out: Path) -> list:
        return ["train", "--model", self.model, "--method", "p-tuning", "--task", "classification",
                "--train", self.data, "--eval", self.data, "--field", "review:text", "--output", out, "-P", "2",
                "--set", "train.steps=15", "--set", "train.eval_every=5", "--set", "train.batch_size=4",
                "--set", "train.eval_batch_size=4", "--set", "train.progress=false",
                "--set", "prompt.encoder_dropout=0.1"]  # dropout in the prompt encoder and the head: RNG matters

    def start(self, name: str, args: list, marker: bool) -> Process:
        self.processes[name] = Process(args, self.root / f"{name}.log", self.root / f"{name}.marker" if marker else None)
        return self.processes[name]

    def start_killed(self, name: str, point: str, *cli_args) -> Process:
        """`softprompt train ...` under crash_child.py, stopping at `point`."""
        return self.start(name, [CHILD, self.root / f"{name}.marker", point, "--", *cli_args], marker=True)

    def reference(self) -> Path:
        """The uninterrupted run's directory, once it has finished."""
        self.processes["reference"].wait()
        return self.root / "reference"

    def resume(self, out: Path, name: str) -> dict:
        """``softprompt train --output OUT --resume`` to the end; its printed summary."""
        log = self.start(name, ["-m", "softprompt.cli", "train", "--output", out, "--resume"], marker=False).wait()
        return json.loads([line for line in log.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def runs(wordpiece_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    model = root / "tiny-bert"
    make_bert(wordpiece_tokenizer).bert.save_pretrained(model)  # a bare encoder: a linear head with dropout
    wordpiece_tokenizer.save_pretrained(model)
    data = root / "reviews.jsonl"
    rows = [{"review": t, "label": "pos"} for t in POS] + [{"review": t, "label": "neg"} for t in NEG]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = Runs(root, model, data)
    runs.start("reference", ["-m", "softprompt.cli", *runs.train_args(root / "reference")], marker=False)
    for name, point in KILLS.items():
        runs.start_killed(name, point, *runs.train_args(root / name))
    prompts = root / "prompts"
    prompts.mkdir()
    runs.start("save", [CHILD, root / "save.marker", "save", model, prompts / "sentiment", root / "expected.safetensors"],
               marker=True)
    yield runs
    for process in runs.processes.values():
        process.stop()


# -- what a run directory holds ---------------------------------------------------------
def visible(folder: Path) -> list[str]:
    """What `ls` shows."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def everything(folder: Path) -> list[str]:
    """What `ls -A` shows."""
    return sorted(p.name for p in folder.iterdir())


def metrics_lines(out: Path) -> list[str]:
    """metrics.jsonl's complete (newline-ended) lines."""
    return (out / "metrics.jsonl").read_text().split("\n")[:-1]


def eval_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics_lines(out)]


def checkpoint_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def assert_whole(out: Path) -> None:
    """Every file of the run directory a user can see is complete: the state a kill leaves."""
    assert set(visible(out)) <= {"config.json", "config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "prompt",
                                 "checkpoint"}
    json.loads((out / "config.json").read_text())
    if (out / "config.yaml").exists():  # whole, as config.json (both written atomically)
        import yaml

        assert yaml.safe_load((out / "config.yaml").read_text()) == json.loads((out / "config.json").read_text())
    if (out / "metrics.json").exists():
        json.loads((out / "metrics.json").read_text())
    if (out / "curves.png").exists():
        png = (out / "curves.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")
    for line in metrics_lines(out):
        json.loads(line)
    for folder in (out / "prompt", out / "checkpoint"):
        assert folder.is_dir(), f"{folder} missing"
        assert visible(folder) == everything(folder)
        for f in folder.iterdir():
            if f.suffix == ".safetensors":
                load_file(f)
            elif f.suffix == ".json":
                json.loads(f.read_text())
    assert {"prompt_config.json", "prompt.safetensors", "task.json"} <= set(visible(out / "prompt"))
    assert visible(out / "checkpoint") == ["state.safetensors", "trainer_state.json"]


def assert_tensors_equal(a: Path, b: Path) -> dict[str, torch.Tensor]:
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y), f"{a.name}: other tensor names"
    different = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
    assert not different, f"{a}: tensors not bit-identical to the uninterrupted run's: {different}"
    return x


def assert_same_run(out: Path, reference: Path) -> None:
    """`out` (a killed run, resumed) ends exactly as the uninterrupted `reference`."""
    assert everything(out) == everything(reference)  # no leftover, hidden or not
    assert everything(out / "prompt") == everything(reference / "prompt")
    for f in (reference / "prompt").iterdir():
        if f.suffix == ".safetensors":
            assert_tensors_equal(out / "prompt" / f.name, f)
        elif f.suffix == ".json":
            assert json.loads((out / "prompt" / f.name).read_text()) == json.loads(f.read_text()), f.name
        else:
            assert (out / "prompt" / f.name).read_bytes() == f.read_bytes(), f.name
    state = assert_tensors_equal(out / "checkpoint" / "state.safetensors", reference / "checkpoint" / "state.safetensors")
    for group in ("prompt.", "task.", "rng.cpu"):  # the comparison covers all of them
        assert any(k.startswith(group) for k in state), group
    assert {k.rsplit(".", 1)[1] for k in state if k.startswith("optim.")} == {"exp_avg", "exp_avg_sq", "step"}
    trainer_state = [json.loads((d / "checkpoint" / "trainer_state.json").read_text()) for d in (out, reference)]
    assert without_timing(trainer_state[0]) == without_timing(trainer_state[1])
    assert eval_steps(out) == EVAL_STEPS  # no row missing, none twice
    rows = [[without_timing(json.loads(line)) for line in metrics_lines(d)] for d in (out, reference)]
    assert rows[0] == rows[1]
    summaries = [without_timing(json.loads((d / "metrics.json").read_text())) for d in (out, reference)]
    assert summaries[0] == summaries[1] and summaries[0]["steps"] == 15
    configs = [json.loads((d / "config.json").read_text()) for d in (out, reference)]
    assert {**configs[0], "output": None} == {**configs[1], "output": None}
    assert (out / "curves.png").read_bytes().endswith(b"IEND\xaeB`\x82")


# -- training killed ----------------------------------------------------------------------
def test_kill_mid_step_resumes_to_the_uninterrupted_weights(runs):
    where = runs.processes["step"].kill_at_marker()
    assert where["point"] == "backward" and where["step"] == 7 and where["grad_enabled"]
    out = runs.root / "step"
    assert_whole(out)
    assert checkpoint_step(out) == 5 and eval_steps(out) == [5]
    row_5 = metrics_lines(out)[0]

    summary = runs.resume(out, "step-resume")
    reference = runs.reference()
    assert without_timing(summary) == without_timing(json.loads((reference / "metrics.json").read_text()))
    assert_same_run(out, reference)
    assert metrics_lines(out)[0] == row_5  # resumed from the checkpoint, not redone from step 0


def test_kill_mid_evaluation_resumes_to_the_uninterrupted_weights(runs):
    where = runs.processes["evaluate"].kill_at_marker()
    # 12 dev examples in batches of 4: killed with one of the three predicted
    assert where == {"point": "evaluate", "evaluation": 2, "batches_done": 1, "examples": 12, "batch_size": 4,
                     "pid": where["pid"]}
    out = runs.root / "evaluate"
    assert_whole(out)
    assert checkpoint_step(out) == 5 and eval_steps(out) == [5]  # the step-10 row is not written yet

    runs.resume(out, "evaluate-resume")
    assert_same_run(out, runs.reference())


def test_kill_mid_checkpoint_write_keeps_the_previous_checkpoint(runs):
    where = runs.processes["checkpoint"].kill_at_marker()
    out = runs.root / "checkpoint"
    assert where["point"] == "checkpoint" and where["checkpoint"] == 2
    partial = out / where["temporary"]
    # Killed with the new checkpoint half-written: its tensors are there, its state is not.
    assert where["written"] == ["state.safetensors"] and everything(partial) == ["state.safetensors"]
    assert where["temporary"].startswith(f".checkpoint.tmp-{spio._host_tag()}-{where['pid']}-")
    assert_whole(out)  # ... and out of sight: `checkpoint/` is the previous one, whole
    assert checkpoint_step(out) == 5
    reference = runs.reference()
    assert sorted(load_file(out / "checkpoint" / "state.safetensors")) == \
        sorted(load_file(reference / "checkpoint" / "state.safetensors"))
    # The step-10 row was written before the checkpoint: the resume must drop and redo it.
    assert eval_steps(out) == [5, 10]

    runs.resume(out, "checkpoint-resume")
    assert not partial.exists()
    assert_same_run(out, reference)


def test_kill_mid_metrics_append_then_mid_final_write_resumes_to_the_uninterrupted_weights(runs):
    out = runs.root / "append"
    where = runs.processes["append"].kill_at_marker()
    assert where["point"] == "append" and where["step"] == 10 and 0 < where["written"] < where["of"]
    text = (out / "metrics.jsonl").read_text()
    assert not text.endswith("\n")  # a torn last line
    assert_whole(out)
    assert checkpoint_step(out) == 5 and eval_steps(out) == [5]

    # The resume survives the torn line, and is itself killed at the very end: metrics.json
    # written, curves.png's temporary file complete but not renamed into place.
    second = runs.start_killed("append-resume", "replace:curves.png", "train", "--output", out, "--resume")
    where = second.kill_at_marker()
    assert where["point"] == "replace" and where["target"] == "curves.png" and where["source_bytes"] > 0
    assert_whole(out)
    assert "curves.png" not in visible(out) and where["source"] in everything(out)
    assert checkpoint_step(out) == 15 and eval_steps(out) == EVAL_STEPS
    assert (out / "metrics.jsonl").read_text().endswith("\n")  # the fragment is gone
    assert json.loads((out / "metrics.json").read_text())["steps"] == 15

    runs.resume(out, "append-resume-2")
    assert_same_run(out, runs.reference())


# -- save_pretrained killed ---------------------------------------------------------------
def test_kill_during_save_pretrained_keeps_the_previous_prompt(runs):
    from softprompt.base_models import load_base

    where = runs.processes["save"].kill_at_marker()
    folder = runs.root / "prompts" / "sentiment"
    # Killed inside the second save: some of its files written (not trainable.safetensors).
    assert where["point"] == "save_pretrained" and where["written"] == \
        ["README.md", "prompt.safetensors", "prompt_config.json"]
    assert where["temporary"].startswith(f".sentiment.tmp-{spio._host_tag()}-{where['pid']}-")
    # A user sees the prompt folder and nothing else; the dead writer's folder is hidden.
    assert visible(folder.parent) == ["sentiment"]
    assert everything(folder.parent) == sorted(["sentiment", where["temporary"]])

    base, tokenizer = load_base(str(runs.model))
    expected = load_file(runs.root / "expected.safetensors")
    loaded = sp.SoftPromptModel.from_pretrained(base, folder, tokenizer=tokenizer, trainable=True)
    assert torch.equal(loaded.export(), expected["first.export"])
    assert not torch.equal(loaded.export(), expected["second.export"])
    state = loaded.prompt.state_dict()
    assert all(torch.equal(v, expected[f"first.{k}"]) for k, v in state.items())
    assert read_config(folder)["metadata"] == {"which": "first"}

    # The next save in that folder's parent removes the dead writer's temporary folder.
    loaded.save_pretrained(folder, metadata={"which": "first"})
    assert everything(folder.parent) == ["sentiment"]
    again = sp.SoftPromptModel.from_pretrained(base, folder, tokenizer=tokenizer)
    assert torch.equal(again.export(), expected["first.export"])


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    """The clean-up touches nothing but `write_directory_atomically`'s own folders of
    writers that are gone: a live process's folder, another name, a file stay."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    here = spio._host_tag()
    there = "0" * 8 if here != "0" * 8 else "1" * 8
    long_ago = time.time() - spio.STALE_AFTER_S - 60

    def folder(name: str, inside: str = "x", mtime: float | None = None) -> Path:
        path = tmp_path / name
        (path / inside).parent.mkdir(parents=True, exist_ok=True)
        (path / inside).write_text(name)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    removed = {
        folder(f".p.tmp-{here}-{gone.pid}-abc_0123"),                      # killed writer
        folder(f".p.tmp-{there}-{gone.pid}-abcd0123", mtime=long_ago),     # another host's, abandoned
        folder(f".q.old-{here}-{gone.pid}-abcd0123", inside="old/prompt.safetensors"),  # killed between renames
    }
    kept = {
        folder(f".p.tmp-{here}-{os.getpid()}-abcd0123"),                   # a live writer's (this process)
        folder(f".p.tmp-{there}-{gone.pid}-wxyz0123"),                     # another host's, recent
        folder(".p.tmp-abcd0123", mtime=long_ago),                         # not our name pattern
        folder(f"p.tmp-{here}-{gone.pid}-abcd0123"),                       # not hidden: a user's
    }
    (tmp_path / f".r.tmp-{here}-{gone.pid}-abcd0123").write_text("a file")  # not a folder
    kept.add(tmp_path / f".r.tmp-{here}-{gone.pid}-abcd0123")

    assert set(spio.remove_stale_temporaries(tmp_path)) == removed
    # The folder moved aside was put back where it belongs (the target was missing).
    assert (tmp_path / "q" / "prompt.safetensors").read_text() == f".q.old-{here}-{gone.pid}-abcd0123"
    assert set(tmp_path.iterdir()) == kept | {tmp_path / "q"}
