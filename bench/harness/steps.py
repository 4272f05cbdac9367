"""One training step of each side, as the speed benchmarks time it, on a batch of random
text: softprompt's step (`our_step`), HF PEFT's (`peft_step`) and the frozen model's floor
(`floor_step`); each method's configuration on both sides at the same sizes (`our_config`,
`peft_config`: PEFT's defaults where it has them).
"""

from __future__ import annotations

from typing import Callable

import torch

P = 20  # virtual tokens, every method
METHODS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "prefix_tuning_noproj", "p_tuning_v2")
DEEP = ("prefix_tuning", "prefix_tuning_noproj", "p_tuning_v2")


def our_config(method: str, hidden: int):
    import softprompt as sp

    template = f"[P:{P}] {{text}} [MASK]"
    return {
        "prompt_tuning": lambda: sp.PromptTuningConfig(template=template),
        # PEFT's defaults: an MLP of width D; a bi-LSTM of D per direction, then an MLP of 2D
        "p_tuning_mlp": lambda: sp.PTuningConfig(template=template, encoder="mlp"),
        "p_tuning_lstm": lambda: sp.PTuningConfig(template=template, encoder="lstm", encoder_hidden_size=2 * hidden),
        "prefix_tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=P, template="{text} [MASK]",
                                                       projection=True, projection_hidden_size=512),
        "prefix_tuning_noproj": lambda: sp.PrefixTuningConfig(num_virtual_tokens=P, template="{text} [MASK]",
                                                              projection=False),
        "p_tuning_v2": lambda: sp.PTuningV2Config(num_virtual_tokens=P, template="{text} [MASK]"),
    }[method]()


def peft_config(method: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=P)
    return {
        "prompt_tuning": lambda: PromptTuningConfig(**common),
        "p_tuning_mlp": lambda: PromptEncoderConfig(**common, encoder_reparameterization_type="MLP"),
        "p_tuning_lstm": lambda: PromptEncoderConfig(**common, encoder_reparameterization_type="LSTM"),
        "prefix_tuning": lambda: PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=512),
        "prefix_tuning_noproj": lambda: PrefixTuningConfig(**common, prefix_projection=False),
        # P-tuning v2 is prefix tuning without reparameterisation: PEFT's prefix tuning
        "p_tuning_v2": lambda: PrefixTuningConfig(**common, prefix_projection=False),
    }[method]()


# -- batches ----------------------------------------------------------------------------
def text_ids(B: int, S: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(B * 100_003 + S)
    return torch.randint(1000, min(vocab, 50000), (B, S), generator=g).to(device)


def our_batch(ids: torch.Tensor, deep: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """What `SoftPromptModel.encode` gives for ``[P:20] {text} [MASK]`` (input methods) or
    ``{text} [MASK]`` (deep): a causal LM's template is cut at [MASK], so the answer slot
    is the last column."""
    B, S = ids.shape
    if deep:
        input_ids, prompt_index = ids, torch.full_like(ids, -1)
    else:
        input_ids = torch.cat([torch.full((B, P), pad_id, dtype=ids.dtype, device=ids.device), ids], 1)
        prompt_index = torch.cat([torch.arange(P, device=ids.device).expand(B, P), torch.full_like(ids, -1)], 1)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), prompt_index=prompt_index,
                answer_index=torch.full((B,), input_ids.shape[1] - 1, device=ids.device))


# -- steps ------------------------------------------------------------------------------
def adamw(params) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.AdamW(params, lr=1e-3, fused=params[0].is_cuda or None)


def our_step(model, task, loss_kind: str, ids: torch.Tensor, tok, graphs: bool = False,
             whole_logits: bool = False) -> Callable[[], None]:
    """softprompt's step as train.py runs it: fused AdamW told on the device to skip a
    non-finite step (found_inf), and each step's loss read one step late (its NaN check).
    The LM loss is the generation task's (`forward.chunked_token_loss`: no (B, S, V)
    logits); `whole_logits`: over the whole logits instead, as before it."""
    batch = our_batch(ids, model.deep, tok.pad_token_id)
    labels = {"labels": torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)}
    optimizer = torch.optim.AdamW([p for p in list(model.prompt.parameters()) + list(task.parameters()) if p.requires_grad],
                                  lr=1e-3, fused=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pending: list[torch.Tensor] = []

    def loss() -> torch.Tensor:
        if loss_kind == "lm":  # the generation task's loss: labels are the real tokens
            return model(**batch, labels=ids, logits="all" if whole_logits else "none").loss
        return task.loss(model, batch, labels)  # the verbalizer's loss at the answer slot

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        value = loss()
        value.backward()
        value = value.detach().float()
        optimizer.found_inf = (~torch.isfinite(value)).float()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pending and not torch.isfinite(pending.pop()).item():
            raise RuntimeError("non-finite loss")
        pending.append(value)

    return step


def peft_step(peft_model, loss_kind: str, ids: torch.Tensor, words: torch.Tensor, autocast: bool) -> Callable[[], None]:
    import torch.nn.functional as F

    mask = torch.ones_like(ids)
    labels = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    optimizer = adamw(p for p in peft_model.parameters() if p.requires_grad)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def loss() -> torch.Tensor:
        if loss_kind == "lm":
            return peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
        logits = peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]  # (B, V)
        return F.cross_entropy(logits.float().log_softmax(-1)[:, words], labels)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def floor_step(base, loss_kind: str, ids: torch.Tensor, words: torch.Tensor, graphs: bool = False) -> Callable[[], None]:
    """Forward + backward of the frozen model to its input embeddings over B x (S + P)."""
    import torch.nn.functional as F

    B, S = ids.shape
    full = torch.cat([ids[:, :P], ids], 1)  # S + P positions
    mask = torch.ones_like(full)
    labels = torch.zeros(B, dtype=torch.long, device=ids.device)
    embeds = base.get_input_embeddings()(full).detach()

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = embeds.clone().requires_grad_(True)
        if loss_kind == "lm":
            value = base(inputs_embeds=x, attention_mask=mask, labels=full, use_cache=False).loss
        else:
            logits = base(inputs_embeds=x, attention_mask=mask, logits_to_keep=1, use_cache=False).logits[:, -1]
            value = F.cross_entropy(logits.float().log_softmax(-1)[:, words], labels)
        value.backward()

    return step
