"""The ``README.md`` written beside a saved prompt: a Hugging Face model card (YAML metadata
through `huggingface_hub.ModelCardData`, then a text), so that a prompt folder can be
published as it is."""

from __future__ import annotations

import json
from typing import Any, Mapping

from huggingface_hub import ModelCard, ModelCardData

METHOD_TAGS = {"prompt-tuning": "prompt-tuning", "p-tuning": "p-tuning", "prefix-tuning": "prefix-tuning",
               "p-tuning-v2": "p-tuning-v2"}


def model_card(config: Mapping[str, Any], task: Mapping[str, Any] | None = None) -> str:
    """The card's text.

    Args:
        config: the prompt's ``prompt_config.json`` content (method, template, base model,
            tensor shape, metadata: task, data, dev metrics, training settings).
        task: the task's ``task.json`` content, when the prompt has a task.
    """
    # imported here: base_models imports io (the atomic writes), which imports this module
    from ..base_models import ALIASES, hub_id

    meta = dict(config.get("metadata") or {})
    base = dict(config.get("base_model") or {})
    base_name = meta.get("model") or base.get("name_or_path") or None
    # The Hub knows a base by its repository id, not by softprompt's alias or a local path.
    base_hub = hub_id(base_name)
    if base_name in ALIASES:
        shown = (f"{base_hub} (softprompt's packaged model `{base_name}`: {ALIASES[base_name]})" if base_hub
                 else f"`{base_name}` (softprompt's packaged model: {ALIASES[base_name]}; no Hub id known)")
    else:
        shown = base_name
    dev = meta.get("dev") or {}
    data = meta.get("data")
    card = ModelCardData(
        library_name="softprompt",
        base_model=base_hub,
        tags=["softprompt", "soft-prompt", METHOD_TAGS.get(config.get("method"), str(config.get("method")))],
        metrics=sorted(k for k, v in dev.items() if isinstance(v, (int, float)) and k != "n") or None,
    )
    lines = [
        f"# {config.get('method')} prompt" + (f" for {base_hub or base_name}" if base_name else ""),
        "",
        f"A soft prompt made with softprompt: the base model stays frozen; this folder holds only the prompt "
        f"({_size(config)}).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {config.get('method')} ({config.get('kind')}, {config.get('num_virtual_tokens')} virtual tokens) |",
        f"| template | `{config.get('template')}` |",
        f"| base model | {shown or 'not recorded'} ({base.get('model_type')}, {base.get('num_layers')} layers, "
        f"hidden {base.get('hidden_size')}) |",
    ]
    if task:
        lines.append(f"| task | {task.get('kind')} |")
        if task.get("labels"):
            lines.append(f"| labels | {', '.join(map(str, task['labels']))} |")
        if task.get("label_words"):
            words = "; ".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in task["label_words"].items())
            lines.append(f"| label words | {words} |")
    if data:
        lines.append(f"| data | {json.dumps(data) if not isinstance(data, str) else data} |")
    if dev:
        scores = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in dev.items())
        lines.append(f"| dev metrics | {scores} (step {meta.get('step')}) |")
    train = meta.get("train")
    if train:
        keep = ("steps", "batch_size", "lr", "head_lr", "schedule", "warmup_ratio", "seed")
        if config.get("method") == "dept":  # its second rate, the low-rank pair's
            keep += ("delta_lr",)
        lines.append("| training | " + ", ".join(f"{k} {train[k]}" for k in keep if k in train) + " |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import softprompt as sp",
        "from softprompt.base_models import load_base",
        f"base, tokenizer = load_base({base_name!r})" if base_name else "base, tokenizer = ...  # the base model above",
        'model = sp.SoftPromptModel.from_pretrained(base, "this-folder", tokenizer=tokenizer)',
        "```",
        "",
        "where `this-folder` is this folder, or its Hub repository `user/repo[@revision][:subfolder]` once "
        "pushed (`softprompt push this-folder user/repo`); or `softprompt predict --prompt this-folder \"some "
        "text\"`, or serve it with `softprompt serve --prompt NAME=this-folder`.",
        "",
    ]
    return str(ModelCard(f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _size(config: Mapping[str, Any]) -> str:
    shape = config.get("tensor_shape") or []
    count = 1
    for n in shape:
        count *= int(n)
    return f"{count:,} values, shape {' x '.join(map(str, shape))}"


__all__ = ["model_card"]
