"""Training under `transformers.Trainer`: a SoftPromptModel and its task as the model Trainer
expects, and the collator that turns examples into its inputs.

    trainer = Trainer(model=TrainerModel(model, task), args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=examples, data_collator=ExampleCollator(model, task))

Trainer optimises the parameters that require gradients: the prompt and the task head (the
base is frozen). Its saves (``save_model`` and checkpoints) write our prompt folder under
``<dir>/prompt`` (what `eval`, `predict`, `serve` and `SoftPromptModel.from_pretrained` load)
and ``<dir>/model.safetensors`` with the trainable tensors only, which Trainer reads back
when it resumes; the frozen base is never copied into a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel

from ..batch import PromptBatch
from ..errors import EncodingError, UnsupportedModelError
from ..folder import RUN_PROMPT, save_with_task
from ..io.atomic import write_file_atomically
from ..packing import refusal

BATCH_KEYS = PromptBatch.TENSORS  # what the collator hands over as the batch (the rest: the task's targets)


class TrainerModel(PreTrainedModel):
    """What `transformers.Trainer` trains: ``forward(**batch, **targets) -> {"loss": ...}``.

    Args:
        model: a SoftPromptModel (its base stays frozen).
        task: its task; bound to `model` here.
    """

    config_class = PretrainedConfig
    base_model_prefix = "softprompt"
    main_input_name = "input_ids"

    def __init__(self, model, task):
        super().__init__(PretrainedConfig())
        task.bind(model)
        self.model = model
        self.task = task

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = PromptBatch(**{k: inputs.pop(k) for k in BATCH_KEYS if k in inputs})
        loss = self.task.loss(self.model, batch, inputs)
        return {"loss": loss}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The prompt's and the head's tensors (what a checkpoint needs; the base is frozen)."""
        return {name: p.detach().contiguous().cpu() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict=None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Trainer's save: our prompt folder in ``prompt/`` and the trainable tensors in
        ``model.safetensors`` (read back by Trainer's resume)."""
        if not is_main_process:
            return
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_with_task(self.model, self.task, directory / RUN_PROMPT, {"trainer": True})
        state = self.trainable_state()
        write_file_atomically(directory / "model.safetensors",
                              lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


class ExampleCollator:
    """Examples (dicts with the template's fields and the task's target) -> one batch of
    `TrainerModel` inputs, through the task's own collation.

    Args:
        pack_tokens: pack each batch's rows padding-free into sequences of at most this many
            tokens (``train.packing``, `softprompt.packing`: the padded batch's loss and
            gradients); None: padded. One process a device (not ``nn.DataParallel``, which
            would split the packed layout by rows).
    """

    def __init__(self, model, task, pack_tokens: int | None = None):
        self.model = model
        self.task = task
        self.pack_tokens = pack_tokens
        if pack_tokens is not None and (why := refusal(model.base, model.spec)) is not None:
            raise UnsupportedModelError(f"cannot pack rows: {why}; leave pack_tokens unset")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        fields = self.model.template.fields
        if examples and not any(f in examples[0] for f in fields):
            raise EncodingError(
                f"examples reach the collator without the template's fields {list(fields)} (they have "
                f"{sorted(examples[0])}): pass TrainingArguments(remove_unused_columns=False)"
            )
        batch, targets = self.task.collate(self.model, list(examples))
        if self.pack_tokens is not None:
            batch = batch.packed(self.pack_tokens)
        out = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        out.update(targets)
        return out


__all__ = ["TrainerModel", "ExampleCollator"]
