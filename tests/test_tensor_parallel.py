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


@pytest.mark.parametrize("method", ["p-tuning-v2", "prompt-tuning"])
def test_training_on_a_tensor_parallel_base_reaches_the_weights_of_one_process(gpt2_tokenizer, tmp_path, method):
    """`softprompt train --set tensor_parallel=true` under torchrun (2 CPU processes, gloo):
    both processes take the same batches and reach the prompt weights that one process
    training on the whole base reaches (6 AdamW steps, 1e-4)."""
    from safetensors.torch import load_file

    from test_distributed import NEG, POS, train

    base = make_llama(gpt2_tokenizer)
    base.save_pretrained(tmp_path / "llama")
    gpt2_tokenizer.save_pretrained(tmp_path / "llama")
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"review": t, "label": label}) + "\n"
                            for texts, label in ((POS, "pos"), (NEG, "neg")) for t in texts))
    args = ["train", "--model", str(tmp_path / "llama"), "--method", method, "--task", "classification",
            "--train", str(data), "--eval", str(data), "--field", "review:text", "--labels", "pos:good",
            "--labels", "neg:bad", "--set", "train.steps=6", "--set", "train.eval_every=3", "--set",
            "train.batch_size=8", "--set", "train.lr=0.1", "--set", "train.progress=false", "-P", "4"]
    one = train([sys.executable, "-m", "softprompt.cli", *args, "--output", str(tmp_path / "one")])
    two = train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "softprompt.cli", *args, "--set", "tensor_parallel=true", "--output", str(tmp_path / "two")])
    assert one["processes"] == 1 and two["processes"] == 2
    a, b = ({k: v for k, v in load_file(tmp_path / run / "checkpoint" / "state.safetensors").items()
             if k.startswith("prompt.")} for run in ("one", "two"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-4, name
    assert two["best"]["train_loss"] == pytest.approx(one["best"]["train_loss"], rel=1e-4)


def test_tensor_parallel_outside_a_distributed_launch_is_refused_by_name(gpt2_tokenizer, tmp_path, monkeypatch):
    from softprompt.base_models import load_base
    from softprompt.errors import ConfigError

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    make_llama(gpt2_tokenizer).save_pretrained(tmp_path / "llama")
    gpt2_tokenizer.save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="start with `torchrun --nproc_per_node N"):
        load_base(str(tmp_path / "llama"), tensor_parallel=True)
    with pytest.raises(ConfigError, match="tensor_parallel must be true or false, got 'yes'"):
        from softprompt.training.config import RunConfig

        RunConfig(tensor_parallel="yes").validate()
