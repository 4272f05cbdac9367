"""Soft prompts on a base split by tensor parallelism (issue 22 item 3): transformers'
``tp_plan="auto"`` over two CPU processes (torchrun, gloo) splits a tiny Llama's attention
by head and its MLP by column; every method's logits, loss, gradients (each process ends
with the whole gradient of the prompt) and greedy tokens equal those of the same prompt
on the whole base. Deep prompts reach each process as its own K/V heads
(`inject.local_kv_heads`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_llama

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def report(tmp_path_factory, gpt2_tokenizer):
    folder = tmp_path_factory.mktemp("tp") / "llama"
    make_llama(gpt2_tokenizer).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "tp_worker.py"), str(folder)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"])
def test_a_prompt_on_a_tensor_parallel_base_equals_it_on_the_whole_base(report, method):
    assert report["tp_size"] == 2
    r = report["methods"][method]
    assert r["logits"] < 1e-5 and r["loss"] < 1e-6, r
    assert r["trainable"] and max(r["grads"].values()) < 1e-6 * max(1.0, r["grad_scale"]), r
    assert r["same_tokens"], r
