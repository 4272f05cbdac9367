"""The training runs a quality report compares, each a function that returns its row's
figures: ours through `softprompt.training.run.run_training` (what `softprompt train` runs), and the
baselines on one loop (`fit`) with the data order, optimiser, schedule and clipping of
`softprompt.training.loop`:

  sentence_baseline  a hand-built classifier over a Hugging Face encoder, for HF PEFT's
                     methods, the linear probe and full fine-tuning (the SST-2 table's
                     PEFT and baseline rows: one head and pooling for all of them)
  full_finetune      full fine-tuning of any softprompt task: the same task head,
                     collation, loss and metrics as a softprompt row, the base trained and
                     no prompt (the vessel is a `SoftPromptModel` with its prompt off)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(where: torch.device):
    """bf16 autocast on a GPU, as accelerate's ``mixed_precision="auto"`` in softprompt.training.loop."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if where.type == "cuda" else nullcontext()


# -- ours ---------------------------------------------------------------------------------
def run_ours(cfg, *, keep: str | None = None) -> dict[str, Any]:
    """Train with `softprompt.training.run.run_training` (as `softprompt train` does) in a scratch
    run directory; return the evaluations, best dev metric, trainable parameters and time.

    Args:
        cfg: a `RunConfig` (its output is replaced by a temporary directory).
        keep: copy the trained prompt folder there (e.g. to evaluate it on test).
    """
    from softprompt.io.atomic import load_tensors
    from softprompt.training.run import run_training

    with tempfile.TemporaryDirectory() as out:
        cfg.output = out
        start = time.perf_counter()
        result = run_training(cfg)
        wall = time.perf_counter() - start
        evals = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        resolved = json.loads((Path(out) / "config.json").read_text())
        prompt = Path(out) / "prompt"
        params = sum(t.numel() for file in ("trainable.safetensors", "head.safetensors") if (prompt / file).exists()
                     for t in load_tensors(prompt / file).values())
        if keep:
            shutil.copytree(prompt, keep, dirs_exist_ok=True)
    metric = result.metrics.get("metric")
    return {"template": resolved["template"], "num_virtual_tokens": resolved["num_virtual_tokens"],
            "trainable_params": params, "metric": metric,
            "evals": [[e["step"], e[metric]] for e in evals], "best_dev": result.best_metric,
            "best_step": result.best_step, "test": result.metrics.get("test"),
            "train_seconds": result.metrics.get("train_seconds"), "wall_seconds": round(wall, 1)}


# -- the baselines' loop --------------------------------------------------------------------
def fit(t, groups: list[dict], train: Sequence[dict], batch_loss: Callable[[list[dict]], torch.Tensor],
        evaluate: Callable[[], float], *, on_best: Callable[[int], None] = lambda step: None) -> dict[str, Any]:
    """`t.steps` steps of AdamW over `groups` (parameter groups with their learning rates), in
    `softprompt.training.order.epoch_batches` order, as softprompt.training.loop runs them: warm-up then decay,
    clipping, a non-finite loss stops the run; `evaluate()` every `t.eval_every` steps and at
    the end, `on_best(step)` at each evaluation better than every earlier one.

    Args:
        t: a `TrainConfig` (steps, batch size, seed, bucketing, optimiser and schedule settings).
        batch_loss: examples -> the scalar loss (run under bf16 autocast on a GPU).

    Returns:
        ``evals`` ([step, score]), ``train_seconds`` (the steps alone) and ``loop_seconds``
        (evaluations included).
    """
    from transformers import get_scheduler

    from softprompt.training.order import epoch_batches

    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.schedule, optimizer, num_warmup_steps=int(t.warmup_ratio * t.steps),
                              num_training_steps=t.steps)
    where = params[0].device
    evals: list[list] = []
    loop_start, train_seconds = time.perf_counter(), 0.0
    epoch, position = 0, 0
    batches = epoch_batches(train, t.batch_size, epoch, t.seed, t.bucket)
    for step in range(1, t.steps + 1):
        start = time.perf_counter()
        if position >= len(batches):
            epoch, position = epoch + 1, 0
            batches = epoch_batches(train, t.batch_size, epoch, t.seed, t.bucket)
        examples = [train[i] for i in batches[position]]
        position += 1
        with autocast(where):
            loss = batch_loss(examples)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        train_seconds += time.perf_counter() - start
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            score = evaluate()
            if not evals or score > max(s for _, s in evals):
                on_best(step)
            evals.append([step, score])
    return {"evals": evals, "train_seconds": train_seconds, "loop_seconds": time.perf_counter() - loop_start}


def best_of(evals: list[list]) -> list:
    """[step, score] of the first evaluation with the best score."""
    return max(evals, key=lambda e: (e[1], -e[0]))


# -- HF PEFT, the linear probe, full fine-tuning of an encoder --------------------------------
class Classifier(nn.Module):
    """Mean of the real tokens' last hidden states -> dropout -> linear (as `SequenceClassification`)."""

    def __init__(self, body: nn.Module, hidden: int, num_labels: int, skip: int):
        super().__init__()
        self.body, self.skip = body, skip
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, skip+T, D)
        # PEFT's prompt tuning / P-tuning return the P virtual positions first; prefix tuning returns T.
        states = states[:, self.skip :]  # (B, T, D)
        if states.shape[1] != attention_mask.shape[1]:
            raise RuntimeError(f"expected {attention_mask.shape[1]} real positions, got {states.shape[1]}")
        w = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D)
        return self.head(self.dropout(pooled.float()))  # (B, num_labels)


class Sentences:
    """Texts to (input_ids (B, T), attention_mask (B, T), label ids (B,)) on a device, truncated
    to leave room for `P` virtual tokens in the encoder's 512 positions."""

    def __init__(self, tok, labels: list[str], where: torch.device, P: int):
        self.tok, self.labels, self.where, self.P = tok, labels, where, P

    def __call__(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.tok([e["text"] for e in examples], padding=True, truncation=True, max_length=512 - self.P,
                       return_tensors="pt")
        y = torch.tensor([self.labels.index(str(e["label"])) for e in examples])
        return enc["input_ids"].to(self.where), enc["attention_mask"].to(self.where), y.to(self.where)


@torch.no_grad()
def accuracy(clf: Classifier, encode: Sentences, examples: list[dict], batch_size: int) -> float:
    """Dev accuracy; batches sorted by length as `softprompt.training.evaluate.evaluate` does."""
    from softprompt.training.order import example_length

    clf.eval()
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        ids, mask, y = encode([examples[i] for i in order[start : start + batch_size]])
        correct += int((clf(ids, mask).argmax(-1) == y).sum())
    clf.train()
    return correct / len(examples)


def sentence_baseline(t, *, model: str, task: str, data_root: str | None, lr: float | None, head_lr: float,
                      P: int, peft: tuple[str, dict] | None = None, full: bool = False) -> dict[str, Any]:
    """One baseline row on a sentence classification recipe: HF PEFT's method (`peft`: its
    config class name and keyword arguments, P virtual tokens), full fine-tuning (`full`) or
    the linear probe (neither); the head and pooling of `Classifier` for all of them.

    Args:
        t: a `TrainConfig`: steps, batch size, eval interval and seed as the row's; the rest
            its defaults (the settings of softprompt.training.loop).
        lr: the encoder's or the prompt's learning rate; head_lr: the head's.
    """
    from accelerate.utils import set_seed

    from softprompt.base_models import load_base
    from softprompt.data import load_recipe

    where = device()
    recipe = load_recipe(task, data_root)
    train, dev = recipe.examples("train"), recipe.examples("dev")
    base, tok = load_base(model)
    set_seed(t.seed)
    extra: dict = {}
    skip = 0
    if peft is not None:
        import peft as hf_peft

        cls_name, kwargs = peft
        config = getattr(hf_peft, cls_name)(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, **kwargs)
        body = hf_peft.get_peft_model(base, config)
        skip = 0 if cls_name == "PrefixTuningConfig" else P
        extra["peft_config"] = {"class": cls_name, "num_virtual_tokens": P, "task_type": "FEATURE_EXTRACTION", **kwargs}
    else:
        body = base
        for p in base.parameters():
            p.requires_grad_(full)
    clf = Classifier(body, base.config.hidden_size, len(recipe.labels), skip).to(where)
    body_params = [p for p in body.parameters() if p.requires_grad]
    groups = [{"params": list(clf.head.parameters()), "lr": head_lr}]
    if body_params:
        groups.insert(0, {"params": body_params, "lr": lr})
    encode = Sentences(tok, recipe.labels, where, P)

    def batch_loss(examples: list[dict]) -> torch.Tensor:
        ids, mask, y = encode(examples)
        return F.cross_entropy(clf(ids, mask).float(), y)

    clf.train()
    run = fit(t, groups, train, batch_loss, lambda: accuracy(clf, encode, dev, t.eval_batch_size))
    best = best_of(run["evals"])
    return {**extra, "trainable_params": sum(p.numel() for g in groups for p in g["params"]), "evals": run["evals"],
            "best_dev_accuracy": best[1], "best_step": best[0], "train_seconds": round(run["loop_seconds"], 1)}


# -- full fine-tuning of a softprompt task ------------------------------------------------------
def full_finetune(cfg, *, lr: float, head_lr: float) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.task`; select the best dev evaluation; score test.

    Args:
        cfg: a `softprompt.training.config.RunConfig` (model, task, data, template, train settings);
            its method and prompt settings are not used.
        lr: learning rate of the base model's weights; head_lr: of the task head.

    Returns:
        ``evals`` ([step, dev metric]), ``best_dev``, ``best_step``, ``test`` (metrics of the
        best state on the test split, where the recipe has one apart from dev),
        ``trainable_params``, ``train_seconds`` (evaluations excluded).
    """
    from accelerate.utils import set_seed

    from softprompt import PTuningV2Config, SoftPromptModel
    from softprompt.architecture import model_kind
    from softprompt.base_models import load_base
    from softprompt.training.assemble import build_task, default_template, load_data
    from softprompt.training.evaluate import evaluate

    t = cfg.train
    data = load_data(cfg)
    base, tokenizer = load_base(cfg.model)
    task = build_task(cfg, data, verbalizer=False)
    template = cfg.template or default_template(cfg, data, task, model_kind(base), 1, deep=True)
    model = SoftPromptModel(base, PTuningV2Config(num_virtual_tokens=1, template=template), tokenizer=tokenizer)
    for p in base.parameters():
        p.requires_grad_(True)  # SoftPromptModel froze them
    model.to(device())
    set_seed(t.seed)
    task.bind(model)
    task.to(device())
    groups = [{"params": list(base.parameters()), "lr": lr}, {"params": list(task.parameters()), "lr": head_lr}]
    best_state: dict[str, torch.Tensor] = {}

    def batch_loss(examples: list[dict]) -> torch.Tensor:
        batch, targets = task.collate(model, examples)
        return task.loss(model, batch, targets)

    def keep_best(step: int) -> None:
        best_state.clear()
        best_state.update({k: v.detach().to("cpu", copy=True) for k, v in
                           {**{f"base.{n}": p for n, p in base.state_dict().items()},
                            **{f"task.{n}": p for n, p in task.state_dict().items()}}.items()})

    model.train()
    task.train()
    with model.disable_prompt():
        run = fit(t, groups, data.train, batch_loss,
                  lambda: evaluate(model, task, data.dev, t.eval_batch_size)[0][task.metric], on_best=keep_best)
        test = None
        if data.test and data.test != data.dev:
            base.load_state_dict({k[5:]: v for k, v in best_state.items() if k.startswith("base.")})
            task.load_state_dict({k[5:]: v for k, v in best_state.items() if k.startswith("task.")})
            test, _ = evaluate(model, task, data.test, t.eval_batch_size)
    best = best_of(run["evals"])
    return {"template": template, "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
            "metric": task.metric, "evals": run["evals"], "best_dev": best[1], "best_step": best[0], "test": test,
            "train_seconds": round(run["train_seconds"], 1)}
