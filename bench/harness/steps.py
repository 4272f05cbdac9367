"""One training step of each side, as the speed benchmarks time it, on a batch of random
text: softprompt's step (`our_step`), HF PEFT's (`peft_step`) and the frozen model's floor
(`floor_step`); each method's configuration on both sides at the same sizes (`our_config`,
`peft_config`: PEFT's defaults where it has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

P = 20  # virtual tokens, every method
METHODS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "prefix_tuning_noproj", "p_tuning_v2")
DEEP = ("prefix_tuning", "prefix_tuning_noproj", "p_tuning_v2")


@dataclass
class TrainBase:
    """The frozen base of a training benchmark (random init, `--model`'s shape) and what every
    row on it reads: the device it is on, the tokenizer, its hidden size and the label words'
    ids. One home for `bench.train.throughput` and `bench.probe.profile_train_step`.

    Attributes:
        words: (2,) the ids of " great" and " terrible" (the verbalizer rows' label words).
    """

    device: str
    tok: Any
    base: torch.nn.Module
    hidden: int
    words: torch.Tensor

    @classmethod
    def build(cls, name: str, tok, attention: str | None = None) -> "TrainBase":
        """Shape `name`'s base on the GPU if there is one (`shapes.build_base`, ``attention``:
        its attention implementation; None: transformers' default)."""
        from bench.harness.shapes import build_base

        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = build_base(name, device, train=True, attention=attention)
        config = base.config
        hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
        words = torch.tensor([tok.encode(" great")[0], tok.encode(" terrible")[0]], device=device)
        return cls(device, tok, base, hidden, words)


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


#: Length mixes of real data, as quantiles (0, 5, ..., 100%) of the text's tokens (GPT-2 BPE).
#: sst2: the 67,349 rows of GLUE SST-2's train.tsv (../shared/data/sst2; mean 12.4 tokens);
#: instruct: an instruction-like mix, log-uniform over 20-1,000 tokens (issue 24).
MIXES = {
    "sst2": [2, 3, 4, 4, 5, 5, 6, 7, 7, 8, 9, 10, 12, 13, 15, 17, 19, 22, 26, 32, 65],
    "instruct": [round(20 * 50 ** (i / 20)) for i in range(21)],
}


def row_lengths(mix: str, B: int, S: int) -> list[int] | None:
    """B text lengths drawn from `mix` (seeded by B and S; at most S each), or None for
    ``fixed``: every row S tokens."""
    if mix == "fixed":
        return None
    quantiles = torch.tensor(MIXES[mix], dtype=torch.float)
    u = torch.rand(B, generator=torch.Generator().manual_seed(B * 7 + S)) * (len(quantiles) - 1)
    low = u.floor().long().clamp(max=len(quantiles) - 2)
    drawn = quantiles[low] + (u - low) * (quantiles[low + 1] - quantiles[low])  # inverse CDF, piecewise linear
    return drawn.round().clamp(1, S).long().tolist()


def our_batch(ids: torch.Tensor, deep: bool, pad_id: int, lengths: list[int] | None = None,
              pack_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """What `SoftPromptModel.encode` gives for ``[P:20] {text} [MASK]`` (input methods) or
    ``{text} [MASK]`` (deep): a causal LM's template is cut at [MASK], so the answer slot
    is the last column. With `lengths`, row b holds the first lengths[b] ids of ``ids[b]``,
    left-padded (a causal LM's side) to the longest; ``labels`` (B, T) are the LM targets
    aligned to the real tokens (-100 at pads). With `pack_tokens`, the rows are packed
    (``pack_index``, `softprompt.packing`) into sequences of at most that many tokens."""
    B, S = ids.shape
    text = torch.ones_like(ids)
    if lengths is not None:
        width = max(lengths)
        ids = torch.stack([torch.cat([ids.new_full((width - n,), pad_id), ids[b, :n]]) for b, n in enumerate(lengths)])
        text = torch.stack([torch.cat([ids.new_zeros(width - n), ids.new_ones(n)]) for n in lengths])
    labels = ids.masked_fill(text == 0, -100)
    if deep:
        input_ids, prompt_index, mask = ids, torch.full_like(ids, -1), text
    else:
        pad = torch.full((B, P), pad_id, dtype=ids.dtype, device=ids.device)
        input_ids = torch.cat([pad, ids], 1)
        prompt_index = torch.cat([torch.arange(P, device=ids.device).expand(B, P), torch.full_like(ids, -1)], 1)
        mask = torch.cat([torch.ones_like(pad), text], 1)
        if lengths is not None:  # the slots follow the row's pads, as `encode` places them
            order = torch.sort(mask, dim=1, stable=True).indices  # pads first, then the row in order
            input_ids, prompt_index, mask = (x.gather(1, order) for x in (input_ids, prompt_index, mask))
    batch = dict(input_ids=input_ids, attention_mask=mask, prompt_index=prompt_index, labels=labels,
                 answer_index=torch.full((B,), input_ids.shape[1] - 1, device=ids.device))
    if pack_tokens is not None:
        from softprompt.packing import pack_index

        batch["pack_index"] = pack_index(mask, mask.sum(1).tolist(), pack_tokens)
    return batch


# -- steps ------------------------------------------------------------------------------
def adamw(params) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.AdamW(params, lr=1e-3, fused=params[0].is_cuda or None)


def our_step(model, task, loss_kind: str, ids: torch.Tensor, tok, graphs: bool = False,
             whole_logits: bool = False, lengths: list[int] | None = None,
             pack_tokens: int | None = None) -> Callable[[], None]:
    """softprompt's step as train.py runs it: fused AdamW told on the device to skip a
    non-finite step (found_inf), and each step's loss read one step late (its NaN check).
    The LM loss is the generation task's (`loss.chunked_token_loss`: no (B, S, V)
    logits); `whole_logits`: over the whole logits instead, as before it. `lengths` /
    `pack_tokens`: rows of a length mix, padded or packed (`our_batch`)."""
    batch = our_batch(ids, model.deep, tok.pad_token_id, lengths, pack_tokens)
    lm_labels = batch.pop("labels")
    labels = {"labels": torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)}
    optimizer = torch.optim.AdamW([p for p in list(model.prompt.parameters()) + list(task.parameters()) if p.requires_grad],
                                  lr=1e-3, fused=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pending: list[torch.Tensor] = []

    def loss() -> torch.Tensor:
        if loss_kind == "lm":  # the generation task's loss: labels are the real tokens
            return model(**batch, labels=lm_labels, logits="all" if whole_logits else "none").loss
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


def peft_step(peft_model, loss_kind: str, ids: torch.Tensor, words: torch.Tensor, autocast: bool,
              lengths: list[int] | None = None) -> Callable[[], None]:
    import torch.nn.functional as F

    mask = torch.ones_like(ids)
    if lengths is not None:  # left-padded rows of a length mix, as `our_batch` lays them out
        padded = our_batch(ids, True, peft_model.base_model.config.pad_token_id or 0, lengths)
        ids, mask = padded["input_ids"], padded["attention_mask"]
    targets = ids.masked_fill(mask == 0, -100)
    labels = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    optimizer = adamw(p for p in peft_model.parameters() if p.requires_grad)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def loss() -> torch.Tensor:
        if loss_kind == "lm":
            return peft_model(input_ids=ids, attention_mask=mask, labels=targets).loss
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


def floor_step(base, loss_kind: str, ids: torch.Tensor, words: torch.Tensor, graphs: bool = False,
               lengths: list[int] | None = None, pack_tokens: int | None = None) -> Callable[[], None]:
    """Forward + backward of the frozen model to its input embeddings over B x (S + P)
    (`lengths`: rows of a length mix, each P longer, padded; with `pack_tokens` packed as
    softprompt packs them, `softprompt.packing`)."""
    import torch.nn.functional as F

    B, S = ids.shape
    full = torch.cat([ids[:, :P], ids], 1)  # S + P positions
    mask = torch.ones_like(full)
    labels = torch.zeros(B, dtype=torch.long, device=ids.device)
    if lengths is not None:
        padded = our_batch(full, True, base.config.pad_token_id or 0, [n + P for n in lengths], pack_tokens)
        full, mask = padded["input_ids"], padded["attention_mask"]
        if pack_tokens is not None:
            return _packed_floor_step(base, loss_kind, padded, words)
    targets = full.masked_fill(mask == 0, -100)
    embeds = base.get_input_embeddings()(full).detach()

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = embeds.clone().requires_grad_(True)
        if loss_kind == "lm":
            value = base(inputs_embeds=x, attention_mask=mask, labels=targets, use_cache=False).loss
        else:
            logits = base(inputs_embeds=x, attention_mask=mask, logits_to_keep=1, use_cache=False).logits[:, -1]
            value = F.cross_entropy(logits.float().log_softmax(-1)[:, words], labels)
        value.backward()

    return step


def _packed_floor_step(base, loss_kind: str, batch: dict, words: torch.Tensor) -> Callable[[], None]:
    """`floor_step` over packed rows: the frozen model on softprompt's packed inputs (no
    prompt), the LM loss of every segment's tokens, or the label words at each segment's end."""
    import torch.nn.functional as F

    from softprompt.architecture import model_spec
    from softprompt.inject import Prompts
    from softprompt.packing import gather_columns, packed_inputs

    index = batch["pack_index"]
    inputs = packed_inputs(base, model_spec(base), batch["input_ids"], batch["attention_mask"], batch["prompt_index"],
                           Prompts(), index, logits_to_keep=1)
    embeds = inputs.pop("inputs_embeds").detach()
    ids = gather_columns(batch["input_ids"], index, -100)
    S = batch["input_ids"].shape[1]
    same_row = (index[:, 1:] // S == index[:, :-1] // S) & (index[:, 1:] >= 0)
    targets = torch.cat([ids[:, 1:].masked_fill(~same_row, -100), torch.full_like(ids[:, :1], -100)], 1)  # in-segment next
    ends = (index >= 0) & torch.cat([~same_row, same_row.new_ones(index.shape[0], 1)], 1)  # each segment's last column
    labels = torch.zeros(int(ends.sum()), dtype=torch.long, device=index.device)
    head = base.get_output_embeddings()

    def step() -> None:
        x = embeds.clone().requires_grad_(True)
        hidden = base(inputs_embeds=x, output_hidden_states=True, **inputs).hidden_states[-1]  # (N, W, D)
        if loss_kind == "lm":
            value = F.cross_entropy(head(hidden[targets != -100]).float(), targets[targets != -100])
        else:
            value = F.cross_entropy(head(hidden[ends]).float().log_softmax(-1)[:, words], labels)
        value.backward()

    return step
