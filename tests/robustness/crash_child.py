"""The child process of tests/robustness/test_crash_safety.py: real work that stops at a
named point, says so, and waits there to be killed with SIGKILL.

    python crash_child.py MARKER POINT -- train ARGS...   # `softprompt train ARGS...`, in-process
    python crash_child.py MARKER save BASE_DIR FOLDER EXPECTED   # two saves of a prompt to FOLDER

Training points:

    backward:N      the autograd engine has started training step N's backward (a hook on
                    that step's loss); the optimizer has not stepped
    evaluate:K:B    the K-th evaluation has predicted B - 1 batches and is about to run batch B
    checkpoint:K    the K-th checkpoint write has written state.safetensors into its temporary
                    folder, not yet trainer_state.json (nor renamed the folder into place)
    append:K        the K-th metrics.jsonl row is half-written (the driver writes the first half
                    of the line, as a write cut short would leave it)
    replace:NAME    an atomic file write (`io.atomic.write_file_atomically`) has its temporary file
                    complete and is about to rename it to NAME

At the point the child writes MARKER (a JSON object saying where it stands, renamed into
place so the parent never reads half of it) and blocks until it is killed. A child whose
parent died instead of killing it exits, so none lingers.

Each point replaces a name that the training modules (softprompt.training.loop, .checkpoint,
.logs; softprompt.io.atomic / .prompt for the saves) look up at run time: our functions, or
the safetensors / os functions as our code calls them; the base model is never touched.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

# The test process, named by the test (reading os.getppid() here could already see the
# reaper's pid if the test died first).
PARENT = int(os.environ.get("CRASH_CHILD_PARENT", os.getppid()))


def stop_here(marker: Path, where: dict) -> None:
    """Report `where` through `marker`, then wait to be killed."""
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({**where, "pid": os.getpid()}))
    os.replace(tmp, marker)
    while os.getppid() == PARENT:  # the test kills us here
        threading.Event().wait(1.0)
    os._exit(3)  # the test process is gone without killing us: do not linger


def arm_training(marker: Path, point: str) -> None:
    import softprompt.training.checkpoint as checkpoint_module
    import softprompt.training.logs as logs
    import softprompt.training.loop as loop

    kind, _, argument = point.partition(":")
    numbers = [int(n) for n in argument.split(":")] if kind != "replace" else []
    calls = {"n": 0}

    if kind == "backward":
        (step,) = numbers
        forward = loop.PromptAndHead.forward

        def counted_forward(self, batch, targets):
            import torch

            calls["n"] += 1  # one call per training micro-batch (grad_accum = 1: per step)
            loss = forward(self, batch, targets)
            if calls["n"] == step:
                grad_enabled = torch.is_grad_enabled()
                loss.register_hook(lambda grad: stop_here(marker, {"point": "backward", "step": calls["n"],
                                                                    "grad_enabled": grad_enabled}))
            return loss

        loop.PromptAndHead.forward = counted_forward
    elif kind == "evaluate":
        evaluation, batch_number = numbers
        evaluate = loop.evaluate

        def counted_evaluate(model, task, examples, batch_size=64):
            calls["n"] += 1
            if calls["n"] == evaluation:
                predict, batches = task.predict, {"n": 0}

                def counted_predict(*args, **kwargs):
                    batches["n"] += 1
                    if batches["n"] == batch_number:
                        stop_here(marker, {"point": "evaluate", "evaluation": calls["n"],
                                           "batches_done": batches["n"] - 1, "examples": len(examples),
                                           "batch_size": batch_size})
                    return predict(*args, **kwargs)

                task.predict = counted_predict  # this evaluation's task object only
            return evaluate(model, task, examples, batch_size)

        loop.evaluate = counted_evaluate
    elif kind == "checkpoint":
        (checkpoint,) = numbers
        save_file = checkpoint_module.save_file  # used by save_checkpoint only

        def counted_save_file(tensors, filename, *args, **kwargs):
            calls["n"] += 1
            save_file(tensors, filename, *args, **kwargs)
            if calls["n"] == checkpoint:
                folder = Path(filename).parent
                stop_here(marker, {"point": "checkpoint", "checkpoint": calls["n"], "temporary": folder.name,
                                   "written": sorted(p.name for p in folder.iterdir())})

        checkpoint_module.save_file = counted_save_file
    elif kind == "append":
        (row_number,) = numbers
        append = logs.append_metrics

        def counted_append(path, row):
            calls["n"] += 1
            if calls["n"] == row_number:
                line = json.dumps(row) + "\n"
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                stop_here(marker, {"point": "append", "row": calls["n"], "step": row["step"],
                                   "written": len(line) // 2, "of": len(line)})
            append(path, row)

        logs.append_metrics = counted_append
    elif kind == "replace":
        import softprompt.io.atomic as spio

        real_os = spio.os

        class Os:
            """io/atomic.py's `os`, with `replace` stopping before it renames onto `name`."""

            def __getattr__(self, attr):
                return getattr(real_os, attr)

            @staticmethod
            def replace(src, dst):
                if Path(dst).name == argument:
                    stop_here(marker, {"point": "replace", "source": Path(src).name, "target": Path(dst).name,
                                       "source_bytes": Path(src).stat().st_size})
                real_os.replace(src, dst)

        spio.os = Os()
    else:
        raise SystemExit(f"crash_child: unknown point {point!r}")


def two_saves(marker: Path, base_dir: str, folder: str, expected: str) -> None:
    """Save prompt A to `folder` (completes), then prompt B, stopping after its first tensor
    file; `expected` gets A's and B's tensors for the parent to compare with."""
    import torch
    from safetensors.torch import save_file

    import softprompt as sp
    import softprompt.io.prompt as spio
    from softprompt.base_models import load_base

    base, tokenizer = load_base(base_dir)

    def prompt(seed: int):
        config = sp.PTuningConfig(num_virtual_tokens=3, init_seed=seed, template="[P:3] {text}")
        return sp.SoftPromptModel(base, config, tokenizer=tokenizer)

    first, second = prompt(1), prompt(2)
    first.save_pretrained(folder, metadata={"which": "first"})
    with torch.no_grad():
        save_file({"first.export": first.export().contiguous(), "second.export": second.export().contiguous(),
                   **{f"first.{k}": v.contiguous() for k, v in first.prompt.state_dict().items()}}, expected)

    real = spio.save_file
    calls = {"n": 0}

    def counted_save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        real(tensors, filename, *args, **kwargs)
        if calls["n"] == 1:
            temporary = Path(filename).parent
            stop_here(marker, {"point": "save_pretrained", "temporary": temporary.name,
                               "written": sorted(p.name for p in temporary.iterdir())})

    spio.save_file = counted_save_file
    second.save_pretrained(folder, metadata={"which": "second"})
    raise SystemExit("crash_child: the second save finished without stopping")


def main(argv: list[str]) -> None:
    marker, point, *rest = argv
    if point == "save":
        two_saves(Path(marker), *rest)
        return
    if not rest or rest[0] != "--":
        raise SystemExit("usage: crash_child.py MARKER POINT -- train ARGS...")
    arm_training(Path(marker), point)
    from softprompt.cli import app

    app(args=rest[1:], prog_name="softprompt")


if __name__ == "__main__":
    main(sys.argv[1:])
