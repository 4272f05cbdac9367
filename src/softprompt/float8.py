"""The frozen base's linear layers in FP8 for training (``train.float8``, opt-in).

Why. A soft prompt's training step runs the frozen base forward and backward to its
activations: two matrix products per linear layer (``x W^T`` and ``g W``), never the weight's
gradient. On Hopper GPUs FP8 products run at twice the bf16 rate. torchao's training
`Float8Linear` computes the weight's gradient as well (a third product, thrown away for a
frozen weight) and casts the weight to FP8 on every call; for a frozen weight both are
waste, so the weight is cast here once, in the two layouts the two products read.

Recipe: E4M3 everywhere with one scale per row ("rowwise": the activations' rows, the
weight's output rows for the forward and its input columns for the backward), the
products through `torch._scaled_mm` with bf16 output; the bias is added in the layer's
dtype. Accuracy: about 2-3 significant bits fewer than bf16 in every product; the gate is
the dev accuracy measured against bf16 (docs/RESULTS.md).

Memory: each converted weight is kept twice in FP8 (1 byte a value, both layouts) beside
the base's own bf16 weight, which the view leaves untouched (the base keeps serving and
evaluating as it is): 2 bytes more per converted parameter while training.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("softprompt.train")

#: largest finite value of E4M3
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
#: _scaled_mm wants both sizes of a weight to be multiples of 16
ALIGN = 16


def rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) E4M3 values and (M, 1) float32 scales with ``x ~ values * scales``
    (each row's largest magnitude maps to E4M3's largest value; an all-zero row gets scale 1)."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    values = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


class _FrozenProducts(torch.autograd.Function):
    """``x W^T`` in FP8 with the gradient of `x` only (the weight is frozen).

    forward(x (M, K), w (N, K) E4M3, w_scale (1, N), wt (K, N) E4M3, wt_scale (1, K)) -> (M, N)."""

    @staticmethod
    def forward(ctx, x, w, w_scale, wt, wt_scale):
        values, scale = rowwise(x)
        ctx.save_for_backward(wt, wt_scale)
        ctx.dtype = x.dtype
        return torch._scaled_mm(values, w.t(), scale_a=scale, scale_b=w_scale, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        wt, wt_scale = ctx.saved_tensors
        values, scale = rowwise(grad.contiguous())
        grad_x = torch._scaled_mm(values, wt.t(), scale_a=scale, scale_b=wt_scale, out_dtype=ctx.dtype)
        return grad_x, None, None, None, None


class Float8Frozen(nn.Module):
    """A frozen `nn.Linear` whose products run in FP8 (see the module docstring); the
    original layer is read, never changed.

    Shapes: input (..., K), output (..., N) for a weight (N, K)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        values, scale = rowwise(weight)  # the forward's: one scale per output row
        self.register_buffer("w", values, persistent=False)
        self.register_buffer("w_scale", scale.view(1, -1), persistent=False)
        values, scale = rowwise(weight.t().contiguous())  # the backward's: one per input column
        self.register_buffer("wt", values, persistent=False)
        self.register_buffer("wt_scale", scale.view(1, -1), persistent=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = _FrozenProducts.apply(flat, self.w, self.w_scale, self.wt, self.wt_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def convertible(linear: nn.Module) -> bool:
    """A plain frozen linear layer whose sizes FP8 products take."""
    return (type(linear) is nn.Linear and not linear.weight.requires_grad
            and (linear.bias is None or not linear.bias.requires_grad)
            and linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0
            and linear.weight.dtype in (torch.bfloat16, torch.float16, torch.float32))


def replacement(module: nn.Module) -> Float8Frozen | None:
    """What a view of the base puts in place of `module` (`regions.view`): a
    `Float8Frozen` for a convertible linear layer, else None (kept)."""
    return Float8Frozen(module) if convertible(module) else None


def holds_convertible(module: nn.Module) -> bool:
    return any(convertible(m) for m in module.modules())


def check(name: str, blocks: list[nn.Module]) -> None:
    """Refuse FP8 where it would change nothing or cannot run: no convertible linear layer
    in the model `name`'s repeated `blocks` (e.g. GPT-2's Conv1D layers), or an FP8
    product the PyTorch build does not have. Otherwise log, in one line, how many of the
    blocks' linear layers run in FP8 and how many stay as they are (and why)."""
    linears = [m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]
    converted = sum(convertible(m) for m in linears)
    if not converted:
        raise ConfigError(f"train.float8: {name}'s blocks have no frozen nn.Linear layers with sizes that are "
                          f"multiples of {ALIGN} to run in FP8")
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        raise ConfigError("train.float8: this PyTorch build has no FP8 matrix products (torch._scaled_mm)")
    kept = len(linears) - converted
    log.info("train.float8: %d of %d linear layers in %s's %d blocks run in FP8 (E4M3, rowwise scales)%s",
             converted, len(linears), name, len(blocks),
             f"; {kept} stay as they are (trainable, a subclass of nn.Linear, or sizes not multiples of {ALIGN})"
             if kept else "")


__all__ = ["Float8Frozen", "replacement", "holds_convertible", "convertible", "check", "rowwise"]
