"""The attention of one decode step alone, kernel against kernel: one-token queries of R
rows (H query heads over H_kv K/V heads) against each row's C slot columns with an additive
(R, 1, 1, C) mask, as `attention.slot_attention` gets them, for each candidate:

  sdpa            the G query heads of a K/V head packed as G query rows, SDPA's default
                  backend (cuDNN flash on H100 / H200: what the step runs today)
  sdpa-efficient  the same on SDPA's memory-efficient (cutlass) backend
  matmul          scores by a batched product, softmax in float32, a second product (eager)
  matmul-compiled the same through `torch.compile` (products and softmax as inductor makes them)
  flex            `flex_attention` (its decoding kernel for short queries, grouped heads,
                  the mask as a score modification), compiled as flex attention must be

    python -m bench.probe.decode_attention --out bench/results/decode_attention.json

Each candidate is recorded 16 times (one call per layer, each on its own K/V buffers, so
nothing is served from L2) in a CUDA graph and the graph replayed; the bound is the K/V bytes
read at the memory bandwidth. Error: the largest difference from a float32 reference.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness.hardware import bandwidth
from bench.harness.report import RESULTS, versions, write_json
from bench.harness.timing import graph_replay_ms


def packed_sdpa(q, k, v, mask, scale):
    R, H, _, D = q.shape
    out = F.scaled_dot_product_attention(q.reshape(R, k.shape[1], H // k.shape[1], D), k, v, attn_mask=mask, scale=scale)
    return out.reshape(R, H, D)


def efficient_sdpa(q, k, v, mask, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return packed_sdpa(q, k, v, mask, scale)


def matmul_attention(q, k, v, mask, scale):
    """(R, H_kv, G, C) scores by one batched product, softmax in float32, then the values."""
    R, H, _, D = q.shape
    packed = q.reshape(R, k.shape[1], H // k.shape[1], D)
    scores = torch.matmul(packed, k.transpose(-1, -2)).float() * scale + mask.float()
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.reshape(R, H, D)


def flex_of():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q, k, v, mask, scale):
        bias = mask[:, 0, 0]  # (R, C)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        out = compiled(q, k, v, score_mod=score_mod, scale=scale, enable_gqa=True)
        return out.reshape(q.shape[0], q.shape[1], q.shape[3])

    return flex


def reference(q, k, v, mask, scale):
    R, H, _, D = q.shape
    G = H // k.shape[1]
    kf, vf = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    scores = q.float() @ kf.transpose(-1, -2) * scale + mask.float()
    return (scores.softmax(-1) @ vf).reshape(R, H, D)


CANDIDATES = {
    "sdpa": lambda: packed_sdpa,
    "sdpa-efficient": lambda: efficient_sdpa,
    "matmul": lambda: matmul_attention,
    "matmul-compiled": lambda: torch.compile(matmul_attention, dynamic=False),
    "flex": flex_of,
}


def inputs(rows: int, heads: int, kv_heads: int, columns: int, used: int, dim: int, layers: int):
    """Queries and per-layer K/V buffers; each row attends to a random-length run of the
    last `used` columns (left padding, as slots hold rows of different lengths)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(rows, heads, 1, dim, device=dev, dtype=dt, generator=g)
    kv = [(torch.randn(rows, kv_heads, columns, dim, device=dev, dtype=dt, generator=g),
           torch.randn(rows, kv_heads, columns, dim, device=dev, dtype=dt, generator=g)) for _ in range(layers)]
    lengths = torch.randint(used // 2, used + 1, (rows,), device=dev, generator=g)
    col = torch.arange(columns, device=dev)
    attend = (col[None] < used) & (col[None] >= used - lengths[:, None])
    mask = torch.where(attend, 0.0, torch.finfo(dt).min).to(dt)[:, None, None, :]
    return q, kv, mask


def time_graph(fn, q, kv, mask, scale) -> float:
    """Milliseconds of one replay of `fn` over every layer's buffers, as a CUDA graph."""
    return graph_replay_ms(lambda: [fn(q, k, v, mask, scale) for k, v in kv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--columns", type=int, nargs="+", default=[192, 1024])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--out", default=str(RESULTS / "decode_attention.json"))
    args = parser.parse_args()
    report = {"benchmark": "decode attention", "device": torch.cuda.get_device_name(0), "versions": versions(),
              "command": "python -m bench.probe.decode_attention", "settings": vars(args), "results": []}
    scale = 1 / math.sqrt(args.dim)
    bw = bandwidth()
    for rows in args.rows:
        for columns in args.columns:
            q, kv, mask = inputs(rows, args.heads, args.kv_heads, columns, columns - 24, args.dim, args.layers)
            want = reference(q, *kv[0], mask, scale)
            kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            bound = 1e3 * kv_bytes / bw
            for name in args.candidates:
                row = {"candidate": name, "rows": rows, "columns": columns, "bound_ms": round(bound, 4)}
                try:
                    fn = CANDIDATES[name]()
                    got = fn(q, *kv[0], mask, scale)
                    row["max_error"] = float((got.float() - want).abs().max())
                    row["ms_16_layers"] = round(time_graph(fn, q, kv, mask, scale), 4)
                    row["share_of_bound"] = round(bound / row["ms_16_layers"], 3)
                except Exception as e:  # a candidate this torch cannot run is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(row, flush=True)
                report["results"].append(row)
                write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
