"""A mixed batch's prompts: every row's task tensor, stacked and gathered row by row.

The bank (`bank.py`) puts each task of a batch on the device once; here those tensors
become one `Prompts` for the whole batch: each distinct task is padded into one slot of a
stack, and an index over the rows gathers the slot of each row's task (one ``index_select``
however many rows share a task). A batch of one task takes its tensor as it is.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from ..inject import Prompts
from ..transfer import tensor_on
from .entry import BankEntry

# Families whose decoder takes its positions from the cache length (BART's learned
# absolute positions): a row behind a longer padded prefix would sit at other positions
# than alone, so their deep prompts share a batch only at equal lengths.
POSITIONS_FROM_CACHE = ("bart", "mbart")


def stack_prompts(entries: Sequence[BankEntry], tensors: Mapping[int, torch.Tensor],
                  deltas: Mapping[int, torch.Tensor], device: torch.device) -> Prompts:
    """The `Prompts` of a batch whose row b runs with ``entries[b]``, from the device copies
    of its tasks' tensors: ``tensors[id(e)]`` for each entry that is `prompted`, ``deltas[id(e)]``
    for each with an input delta (keyed by entry, not name: a batch may hold rows of a task
    and of its replacement).

    Input tasks' tables are stacked to (B, P_in, D) (rows of deep tasks get zeros, which
    no slot of theirs reads); deep tasks' prefixes to (L, 2, B, H_kv, P_deep, D_head)
    with a (B, P_deep) mask: 1 on the last P of the row's task (a shorter prefix is
    padded in front), 0 on padding and on the rows of input tasks. Rows of the base
    alone (`PromptBank.add_base`) are input rows with no virtual slot: zeros no slot
    reads, a masked prefix; a batch of them only has no prompts at all. DePT tasks' input
    deltas are stacked to (B, S_max, D), zeros on shorter deltas' tail and on the rows of
    other tasks (adding 0 leaves an embedding exactly as it is).

    Raises:
        ConfigError: deep prompts of different lengths in one batch of a
            `POSITIONS_FROM_CACHE` family.
    """
    unique = list({id(e): e for e in entries}.values())  # the batch's tasks, each padded and stacked once
    if not tensors:  # rows of the base alone: no prompt at all
        return Prompts()
    if len(unique) == 1:  # one task: its tensor serves every row as it is (no copies)
        entry = entries[0]
        if entry.deep:
            return Prompts(prefix=tensors[id(entry)])
        return Prompts(tables=tensors[id(entry)], input_delta=deltas.get(id(entry)))
    slot = {id(e): u for u, e in enumerate(unique)}
    row_slot = tensor_on([slot[id(e)] for e in entries], device)  # (B,), without waiting for the device
    tables = prefix = mask = None
    plain = [e for e in unique if not e.deep]
    inputs = [e for e in plain if e.prompted]
    if inputs:
        P = max(e.num_virtual_tokens for e in inputs)
        stack = torch.zeros(len(unique), P, inputs[0].served.shape[-1], device=device)  # rows of deep tasks: 0
        for e in inputs:
            stack[slot[id(e)], : e.num_virtual_tokens] = tensors[id(e)]
        tables = stack.index_select(0, row_slot)  # (B, P, D)
    deeps = [e for e in unique if e.deep]
    if deeps:
        P = max(e.num_virtual_tokens for e in deeps)
        lengths = sorted({e.num_virtual_tokens for e in deeps} | ({0} if plain else set()))
        if len(lengths) > 1 and deeps[0].model.spec.model_type in POSITIONS_FROM_CACHE:
            raise ConfigError(
                f"{deeps[0].model.spec.model_type} decoders place tokens after the cached prefix by its length: "
                f"rows with deep prompts of different lengths ({lengths}) cannot share a batch; group them by "
                "prompt length (see prompt_length)")
        L, _, H, _, Dh = deeps[0].served.shape
        stack = torch.zeros(L, 2, len(unique), H, P, Dh, dtype=deeps[0].served.dtype, device=device)
        valid = torch.zeros(len(unique), P, dtype=torch.long, device=device)
        for e in deeps:
            # A shorter prefix ends where the longest does: the row's tokens then sit
            # right after its own prefix, at the distance relative position biases
            # (T5) see when the row runs alone; position ids come from the mask.
            stack[:, :, slot[id(e)], :, P - e.num_virtual_tokens :] = tensors[id(e)]
            valid[slot[id(e)], P - e.num_virtual_tokens :] = 1
        prefix = stack.index_select(2, row_slot)  # (L, 2, B, H_kv, P, D_head)
        mask = valid.index_select(0, row_slot)  # (B, P)
    input_delta = None
    if deltas:
        with_delta = [e for e in unique if id(e) in deltas]
        S_max = max(e.input_delta.shape[0] for e in with_delta)
        stack = torch.zeros(len(unique), S_max, with_delta[0].input_delta.shape[1], device=device)
        for e in with_delta:
            stack[slot[id(e)], : e.input_delta.shape[0]] = deltas[id(e)]
        input_delta = stack.index_select(0, row_slot)  # (B, S_max, D)
    return Prompts(tables=tables, prefix=prefix, prefix_mask=mask, input_delta=input_delta)


__all__ = ["POSITIONS_FROM_CACHE", "stack_prompts"]
