"""Sibling projections as one matrix product in the compiled decode step.

Why. A decode step of R rows multiplies each layer's (R, D) hidden states by Q, K and V
(and, in the MLP, by gate and up) as separate products. At decode sizes each product is
bound by reading its weight, and the small ones (K and V of grouped-query attention: 2 MiB
each at the 1B Llama shape) run far below the memory bandwidth in cuBLAS. One product over
the weights side by side reads the same bytes in one kernel: measured alone on an H100
(`bench.probe.fused_products`), 1B shape, 64 rows: 1.33 -> 1.12 ms for every layer's
products and the LM head, the same results to the bit.

How, without touching what the base computes:

1. `pack_siblings` moves each layer's sibling weights (``q_proj``/``k_proj``/``v_proj``,
   ``gate_proj``/``up_proj``: `nn.Linear`s reading the same input) into one contiguous
   buffer, in that order; each module's weight becomes a view of its rows. The values, the
   modules and their forwards stay as loaded; the memory is the same (one layer's siblings
   are copied at a time).
2. The decode step is compiled with inductor's freezing (the weights become constants of
   the graph: `torch._inductor.config.freezing`, which dynamo reads when it traces, so it is
   set around the compiled call, not passed as an option) and `SiblingProducts`, a
   post-grad pass: products ``x @ W_i`` of one input whose constant weights lie side by side
   in one storage become one product ``x @ [W_1 ... W_n]`` (a view over the buffer: no copy)
   and slices of its columns. Weights that do not lie side by side are left alone, so the
   pass never copies a weight.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: Sibling linear layers of one module that read the same input, in the order packed.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def pack_siblings(base: nn.Module) -> int:
    """Lay each module's sibling weights (`SIBLINGS`) side by side in one buffer; returns
    the number of groups packed (already packed groups count, they are left as they are).

    Call it before anything captures a CUDA graph of the base: the weights move (their old
    storage is freed), and a graph captured before reads the old addresses. On an H100 the
    decode probe hit an illegal memory access that way: the decoder's first join replayed
    prefill graphs captured before the decode step, made after that join, packed the
    weights (`Decoder` now packs when it is made, before its first prefill).

    Only plain floating-point `nn.Linear` weights of one dtype, device and input size are
    packed (not split `DTensor`s or quantized weights); biases are packed alike when every
    sibling has one, and a group where only some have one is left alone."""
    packed = 0
    for module in base.modules():
        for names in SIBLINGS:
            linears = [getattr(module, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears):
                continue
            weights = [linear.weight for linear in linears]
            biases = [linear.bias for linear in linears]
            if not _packable(weights) or (any(b is not None for b in biases) and not (
                    all(b is not None for b in biases) and _packable(biases))):
                continue
            for tensors in (weights, biases):
                if tensors[0] is not None and not side_by_side([t.detach() for t in tensors]):
                    _share_one_buffer(tensors)
            packed += 1
    return packed


def _packable(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(type(t.data) is torch.Tensor and t.dtype == first.dtype and t.dtype.is_floating_point
               and t.device == first.device and t.shape[1:] == first.shape[1:] and t.is_contiguous()
               for t in tensors)


@torch.no_grad()
def _share_one_buffer(params: list[nn.Parameter]) -> None:
    whole = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        p.data = whole[start : start + p.shape[0]]  # a view of the buffer: same values, same module
        start += p.shape[0]


def side_by_side(tensors: list[torch.Tensor]) -> bool:
    """Whether contiguous tensors of equal trailing shape follow each other in one storage
    (the first's rows, then the second's, ...)."""
    first = tensors[0]
    row = first[0].numel() if first.dim() > 1 else 1
    end = first.storage_offset()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or not t.is_contiguous()
                or t.storage_offset() != end):
            return False
        end += t.shape[0] * row
    return True


class SiblingProducts(CustomGraphPass):
    """Inductor post-grad pass (with freezing): ``mm(x, W_i)`` / ``addmm(b_i, x, W_i)`` of one
    input ``x`` whose constant weights ``W_i`` (K, N_i) are the transposed rows of one buffer
    side by side (`pack_siblings`) become one ``mm(x, W)`` (K, sum N_i) over the buffer and
    column slices of it."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        module = graph.owning_module
        for (x, _), members in _products_by_input(graph, module).items():
            for run in _side_by_side_runs(members):
                if len(run) > 1:
                    _fuse(graph, module, x, run)

    def uuid(self) -> str:  # inductor's cache key for the pass
        return "softprompt.sibling_products.v1"


def _constant(module, node):
    """The tensor of a ``get_attr`` node (a frozen constant), else None."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = getattr(module, node.target, None)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _products_by_input(graph: torch.fx.Graph, module) -> dict:
    """Products of a constant transposed weight, grouped by (input node, has bias).

    Returns: {(x, has_bias): [(node, W (K, N), b (N,) or None)]} in graph order."""
    groups: dict = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is aten.mm.default:
            (x, w), bias = node.args, None
        elif node.target is aten.addmm.default and len(node.args) == 3:
            bias, x, w = node.args
        else:
            continue
        weight = _constant(module, w)
        b = _constant(module, bias)
        if weight is None or weight.dim() != 2 or weight.stride() != (1, weight.shape[0]):
            continue  # not the transposed view of a row-major (N, K) weight
        if bias is not None and (b is None or b.dim() != 1):
            continue
        groups[(x, bias is not None)].append((node, weight, b))
    return groups


def _side_by_side_runs(members: list) -> list[list]:
    """The members split into runs whose weights (and biases) follow each other in storage."""
    members = sorted(members, key=lambda m: (m[1].untyped_storage().data_ptr(), m[1].storage_offset()))
    runs: list[list] = []
    for member in members:
        if runs:
            last = runs[-1][-1]
            pair = [last, member]
            if side_by_side([m[1].t() for m in pair]) and (
                    member[2] is None or side_by_side([m[2] for m in pair])):
                runs[-1].append(member)
                continue
        runs.append([member])
    return runs


def _fuse(graph: torch.fx.Graph, module, x: torch.fx.Node, run: list) -> None:
    from torch._dynamo.utils import counters
    from torch._guards import detect_fake_mode

    weights = [w for _, w, _ in run]
    widths = [w.shape[1] for w in weights]
    first_w, first_b = weights[0], run[0][2]
    whole_w = first_w.as_strided((first_w.shape[0], sum(widths)), (1, first_w.shape[0]), first_w.storage_offset())
    whole_b = None if first_b is None else first_b.as_strided((sum(widths),), (1,), first_b.storage_offset())
    order = {node: i for i, node in enumerate(graph.nodes)}
    earliest = min((node for node, _, _ in run), key=order.__getitem__)
    fake = detect_fake_mode([x.meta["val"]])
    name = _free_name(module, "_sibling_product_w")
    module.register_buffer(name, whole_w, persistent=False)
    with graph.inserting_before(earliest):
        w_node = graph.get_attr(name)
        w_node.meta["val"] = fake.from_tensor(whole_w, static_shapes=True)
        if whole_b is None:
            product = graph.call_function(aten.mm.default, (x, w_node))
            product.meta["val"] = aten.mm.default(x.meta["val"], w_node.meta["val"])
        else:
            b_name = _free_name(module, "_sibling_product_b")
            module.register_buffer(b_name, whole_b, persistent=False)
            b_node = graph.get_attr(b_name)
            b_node.meta["val"] = fake.from_tensor(whole_b, static_shapes=True)
            product = graph.call_function(aten.addmm.default, (b_node, x, w_node))
            product.meta["val"] = aten.addmm.default(b_node.meta["val"], x.meta["val"], w_node.meta["val"])
        parts, start = [], 0
        for width in widths:
            part = graph.call_function(aten.slice.Tensor, (product, 1, start, start + width))
            part.meta["val"] = aten.slice.Tensor(product.meta["val"], 1, start, start + width)
            parts.append(part)
            start += width
    for (node, _, _), part in zip(run, parts):  # after the insertions: they go before `earliest`
        node.replace_all_uses_with(part)
        graph.erase_node(node)
    counters["inductor"]["sibling_products"] += 1  # what tests and probes read


def _free_name(module, stem: str) -> str:
    i = 0
    while hasattr(module, f"{stem}{i}"):
        i += 1
    return f"{stem}{i}"


def frozen_with_siblings():
    """The inductor settings a compiled call runs under: weights frozen as constants and
    `SiblingProducts` after the post-grad passes (a context manager; dynamo and inductor
    read them when the call compiles)."""
    import torch._inductor.config as inductor

    # (CPU: no mkldnn weight prepacking, which would copy every weight and hide the products)
    # (no FX graph cache: its key does not see where the weights lie, so a graph compiled
    # before the weights were packed would be reused unfused)
    return inductor.patch({"freezing": True, "post_grad_custom_post_pass": SiblingProducts(),
                           "cpp.weight_prepack": False, "fx_graph_cache": False})


def compiled_with_siblings(base: nn.Module, forward, options: dict):
    """`forward` (a call of `base`) compiled with `base`'s sibling weights packed, frozen and
    fused: a callable that keeps `frozen_with_siblings` in force whenever the compiler
    traces or compiles (its first call, and each recompile when a decode step's columns
    grow). `forward` must be a code object of its own: dynamo keys compiled versions by
    code and guards, not by the compiler's settings."""
    pack_siblings(base)
    compiled = torch.compile(forward, **options)

    def call():
        with frozen_with_siblings():
            return compiled()

    return call


__all__ = ["SIBLINGS", "compiled_with_siblings", "SiblingProducts", "frozen_with_siblings", "pack_siblings", "side_by_side"]
