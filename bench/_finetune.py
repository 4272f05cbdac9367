"""Full fine-tuning as a baseline for any softprompt task: the same task head, collation,
loss, metrics, data order, optimiser, schedule and clipping as `softprompt.train`, with
the base model's weights trained and no prompt.

The vessel is a `SoftPromptModel` with its prompt switched off (`disable_prompt`: the bare
base model on the template's real tokens), so the only differences from a softprompt row
are the trainable base and the missing prompt.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def full_finetune(cfg, *, lr: float, head_lr: float) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.task`; select the best dev evaluation; score test.

    Args:
        cfg: a `softprompt.runconfig.RunConfig` (model, task, data, template, train settings);
            its method and prompt settings are not used.
        lr: learning rate of the base model's weights; head_lr: of the task head.

    Returns:
        ``evals`` ([step, dev metric]), ``best_dev``, ``best_step``, ``test`` (metrics of the
        best state on the test split, where the recipe has one apart from dev),
        ``trainable_params``, ``train_seconds``.
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from softprompt import PTuningV2Config, SoftPromptModel
    from softprompt.architecture import model_kind
    from softprompt.base_models import load_base
    from softprompt.training.assemble import build_task, default_template, load_data
    from softprompt.training.evaluate import evaluate
    from softprompt.training.order import epoch_batches

    t = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_data(cfg)
    base, tokenizer = load_base(cfg.model)
    task = build_task(cfg, data, verbalizer=False)
    template = cfg.template or default_template(cfg, data, task, model_kind(base), 1, deep=True)
    model = SoftPromptModel(base, PTuningV2Config(num_virtual_tokens=1, template=template), tokenizer=tokenizer)
    for p in base.parameters():
        p.requires_grad_(True)  # SoftPromptModel froze them
    model.to(device)
    set_seed(t.seed)
    task.bind(model)
    task.to(device)
    groups = [{"params": list(base.parameters()), "lr": lr}, {"params": list(task.parameters()), "lr": head_lr}]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.schedule, optimizer, num_warmup_steps=int(t.warmup_ratio * t.steps),
                              num_training_steps=t.steps)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    evals, best, best_state = [], None, None
    model.train()
    task.train()
    epoch, position, seconds = 0, 0, 0.0
    batches = epoch_batches(data.train, t.batch_size, epoch, t.seed, t.bucket)
    with model.disable_prompt():
        for step in range(1, t.steps + 1):
            start = time.perf_counter()
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = epoch_batches(data.train, t.batch_size, epoch, t.seed, t.bucket)
            batch, targets = task.collate(model, [data.train[i] for i in batches[position]])
            position += 1
            with autocast:
                loss = task.loss(model, batch, targets)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            seconds += time.perf_counter() - start
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                scores, _ = evaluate(model, task, data.dev, t.eval_batch_size)
                evals.append([step, scores[task.metric]])
                if best is None or scores[task.metric] > best[1]:
                    best = (step, scores[task.metric])
                    best_state = {k: v.detach().to("cpu", copy=True)
                                  for k, v in {**{f"base.{n}": p for n, p in base.state_dict().items()},
                                               **{f"task.{n}": p for n, p in task.state_dict().items()}}.items()}
        test = None
        if data.test and data.test != data.dev:
            base.load_state_dict({k[5:]: v for k, v in best_state.items() if k.startswith("base.")})
            task.load_state_dict({k[5:]: v for k, v in best_state.items() if k.startswith("task.")})
            test, _ = evaluate(model, task, data.test, t.eval_batch_size)
    return {"template": template, "trainable_params": sum(p.numel() for p in params), "metric": task.metric,
            "evals": evals, "best_dev": best[1], "best_step": best[0], "test": test,
            "train_seconds": round(seconds, 1)}


__all__ = ["full_finetune"]
