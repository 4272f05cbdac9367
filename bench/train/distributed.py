"""Training on more than one GPU with `accelerate launch`: data-parallel (DDP) and FSDP (the
frozen base sharded), through `softprompt.training.loop.train` itself, against one GPU.

    python -m bench.train.distributed --out bench/results/train_distributed.json     # on 2 GPUs

It launches, for each configuration, the same worker (this module with ``--worker``), from
the repository root:

  1 GPU       python -m bench.train.distributed --worker ...
  DDP, 2 GPUs accelerate launch --multi_gpu --num_processes 2 -m bench.train.distributed --worker ...
  FSDP 2 GPUs accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 \\
                --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer \\
                -m bench.train.distributed --worker ...

The worker builds a randomly initialised Llama shape in bf16 on its process's GPU (same seed
on every process), a prompt-tuning prompt (20 virtual tokens) with a verbalizer, and trains
on random ~256-token texts with the same global batch in every configuration, one run of
--steps steps (its first steps included, as in any run). Scaling efficiency =
tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, ROOT, versions, write_json
from bench.harness.shapes import build_base, tokenizer

MODULE = ["-m", "bench.train.distributed"]

# ZeRO-3 through accelerate needs the micro-batch size in a DeepSpeed file: the loop prepares
# no DataLoader for accelerate to read it from.
ZERO3 = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_accumulation_steps": 1,
         "gradient_clipping": 1.0, "bf16": {"enabled": False}}
FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_reshard_after_forward", "true"]


def worker(args) -> None:
    import softprompt as sp
    from softprompt.tasks import Verbalizer
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    tok = tokenizer()
    base = build_base(args.model, f"cuda:{local}" if cuda else "cpu", train=True)
    model = sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:20] {text} It was [MASK] ."), tokenizer=tok)
    task = Verbalizer({"positive": " great", "negative": " terrible"})
    rng = random.Random(0)
    vocab = [w for w in ("the a film plot actor scene story music light dark long short good bad slow fast "
                         "moving funny quiet loud cast script ending").split()]
    examples = [{"text": " ".join(rng.choice(vocab) for _ in range(args.words)), "label": rng.choice(["positive", "negative"])}
                for _ in range(args.batch_size * (args.steps + 8))]
    tokens_per_example = sum(int(model.encode(e)["attention_mask"].sum()) for e in examples[:64]) / 64
    # One run, as a user runs it (FSDP 2 shards the model in place: it is prepared once).
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=0, progress=False, bucket=False,
                         lr=1e-3, warmup_ratio=0.0)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train(model, task, examples, None, config, out)
        seconds = {"timed": (result.metrics["train_seconds"], time.perf_counter() - start)}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    world = int(os.environ.get("WORLD_SIZE", 1))
    peaks = [peak]
    if world > 1 and torch.distributed.is_initialized():
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
    if int(os.environ.get("RANK", 0)) == 0:
        step_s = seconds["timed"][0] / args.steps
        Path(args.result).write_text(json.dumps({
            "processes": world, "model": args.model, "global_batch": args.batch_size,
            "tokens_per_example": round(tokens_per_example, 1), "ms_per_step": round(step_s * 1e3, 2),
            "tokens_per_s": round(args.batch_size * tokens_per_example / step_s, 1),
            "peak_gib_per_process": [round(p, 2) for p in peaks], "wall_s_timed_run": round(seconds["timed"][1], 2),
            "distributed": (os.environ.get("ACCELERATE_USE_FSDP") == "true" and "fsdp2"
                            or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and "deepspeed-zero3"
                            or (world > 1 and "ddp") or "none"),
        }))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launch(prefix: list[str], args, model: str, batch: int, label: str, report: dict, out: Path) -> None:
    result = Path(tempfile.mkdtemp()) / "result.json"
    command = prefix + MODULE + ["--worker", "--model", model, "--batch-size", str(batch), "--steps", str(args.steps),
                                 "--words", str(args.words), "--result", str(result)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    row = {"config": label, "command": " ".join(command[:-2])}
    if done.returncode == 0 and result.exists():
        row.update(json.loads(result.read_text()))
    else:
        text = (done.stderr or "") + (done.stdout or "")
        # The launcher's own traceback ends the output; the workers' lines say what failed.
        ranks = [line for line in text.splitlines() if line.startswith("[rank")]
        row["error"] = "\n".join(ranks[-40:])[-4000:] if ranks else text[-2500:]
    row["launch_s"] = round(time.perf_counter() - start, 1)
    report["rows"].append(row)
    print({k: v for k, v in row.items() if k != "error"}, row.get("error", "")[-600:], flush=True)
    write_json(report, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--fsdp-model", default="llama-8b")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--words", type=int, default=240)
    parser.add_argument("--result", default="")
    parser.add_argument("--configs", default="1gpu,ddp,fsdp-1gpu,fsdp")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_distributed.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    report = {"benchmark": "train_distributed", "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
              "versions": versions(), "rows": []}
    python, accelerate = [sys.executable], [sys.executable, "-m", "accelerate.commands.launch"]
    plans = {
        "1gpu": (python, args.model, args.batch_size),
        "1gpu-half": (python, args.model, args.batch_size // 2),  # one GPU with the per-GPU batch of the 2-GPU runs
        "ddp": (accelerate + ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"], args.model, args.batch_size),
        "fsdp-1gpu": (python, args.fsdp_model, args.batch_size),
        "fsdp": (accelerate + FSDP + ["--num_processes", "2", "--mixed_precision", "no"], args.fsdp_model, args.batch_size),
    }
    ds_file = Path(tempfile.mkdtemp()) / "zero3.json"
    ds_file.write_text(json.dumps({**ZERO3, "train_micro_batch_size_per_gpu": args.batch_size // 2}))
    plans["zero3"] = (accelerate + ["--use_deepspeed", "--deepspeed_config_file", str(ds_file), "--num_processes", "2",
                                    "--zero3_init_flag", "false"], args.fsdp_model, args.batch_size)
    for label in args.configs.split(","):
        prefix, model, batch = plans[label]
        launch(prefix, args, model, batch, label, report, args.out)
    rows = {r["config"]: r for r in report["rows"] if "tokens_per_s" in r}
    for two, one in (("ddp", "1gpu"), ("fsdp", "fsdp-1gpu"), ("zero3", "fsdp-1gpu")):
        if two in rows and one in rows:
            rows[two]["scaling_efficiency"] = round(rows[two]["tokens_per_s"] / (2 * rows[one]["tokens_per_s"]), 3)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
