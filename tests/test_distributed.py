"""Data-parallel training on `accelerate`: two CPU processes (torchrun, gloo) each take half
of every batch; with gradients averaged across them they reach the prompt weights of one
process on the whole batch. Dropout is off (its masks depend on how rows are split).

Tolerance: 1e-4 absolute after 6 AdamW steps (the all-reduce sums in another order than one
process's backward; measured differences are ~1e-5 on weights of magnitude ~0.5)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import make_gpt2

POS = ["a gem of a film", "wonderful acting", "great fun", "a delight", "moving and funny", "superb", "loved it",
       "brilliant"]
NEG = ["a dull mess", "terrible plot", "boring", "a waste of time", "awful dialogue", "tedious", "hated it", "dreadful"]


@pytest.fixture
def setup(gpt2_tokenizer, tmp_path):
    model = make_gpt2(gpt2_tokenizer)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(tmp_path / "gpt2")
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    data = tmp_path / "reviews.jsonl"
    rows = [{"review": t, "label": "pos"} for t in POS] + [{"review": t, "label": "neg"} for t in NEG]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, ["train", "--model", str(tmp_path / "gpt2"), "--method", "p-tuning", "--task", "classification",
                      "--train", str(data), "--eval", str(data), "--field", "review:text", "--labels", "pos:good",
                      "--labels", "neg:bad", "--set", "train.steps=6", "--set", "train.eval_every=3",
                      "--set", "train.batch_size=8", "--set", "train.lr=0.1", "--set", "train.progress=false", "-P", "4"]


def train(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def test_two_processes_reach_the_weights_of_one(setup):
    tmp, args = setup
    one = train([sys.executable, "-m", "softprompt.cli", *args, "--output", str(tmp / "one")])
    two = train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "softprompt.cli", *args, "--output", str(tmp / "two")])
    assert one["processes"] == 1 and two["processes"] == 2
    # the prompt's trainable state after the last step (the checkpoint's "prompt." tensors)
    a, b = ({k: v for k, v in load_file(tmp / run / "checkpoint" / "state.safetensors").items()
             if k.startswith("prompt.")} for run in ("one", "two"))
    assert a.keys() == b.keys() and len(a) > 3  # the P-tuning encoder (LSTM + MLP) and the table
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, name
    assert any((a[name] != 0).any() for name in a)
    # every process logs the global batch's loss
    assert two["best"]["train_loss"] == pytest.approx(one["best"]["train_loss"], rel=1e-5)
