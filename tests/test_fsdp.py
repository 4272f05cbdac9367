"""FSDP 2 (the frozen base's blocks and the prompt-and-head unit sharded over two CPU
processes, gloo): the training loop's saves gather the sharded prompt and head, and what they
write equals one unsharded process's weights on the same global batch.

Tolerance: 1e-5 absolute after 3 SGD-with-momentum steps (the reduce-scatter sums the halves'
gradients in another order than one process's backward)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sharded_training_saves_the_whole_prompt_and_head(tmp_path):
    run([sys.executable, str(WORKER), str(tmp_path / "one")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(tmp_path / "two")])
    assert json.loads((tmp_path / "two" / "done.json").read_text()) == {"world": 2, "sharded": True}
    for name in ("prompt/trainable.safetensors", "prompt/prompt.safetensors", "prompt/head.safetensors",
                 "checkpoint/state.safetensors"):
        one, two = (load_file(tmp_path / run_ / name) for run_ in ("one", "two"))
        keys = [k for k in one if not k.startswith("rng.")]
        assert keys and set(keys) <= set(two), name
        for key in keys:
            assert one[key].shape == two[key].shape, (name, key)  # whole, not a shard
            assert (one[key] - two[key]).abs().max().item() < 1e-5, (name, key)
        assert any((one[k] != 0).any() for k in keys)
