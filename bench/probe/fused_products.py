"""The weights' matrix products of one decode step alone, as the base's modules run them
(one product per projection) against the same products with the projections that read the
same input concatenated (Q, K and V as one; gate and up as one): what fusing them would gain
before the engine is changed to do it (issue 19: the compiled 64-row step spends 1.28 ms in
products on an H100, 1.7x the weight-read bound).

  separate  per layer: x @ Wq, x @ Wk, x @ Wv, a @ Wo, x @ Wgate, x @ Wup, h @ Wdown
  fused     per layer: x @ [Wq; Wk; Wv], a @ Wo, x @ [Wgate; Wup], h @ Wdown

The shape's sizes come from `bench.harness.shapes` (``--shape``, the 1B Llama by default:
hidden 2048, 32 heads over 8 K/V heads of 64, intermediate 8192, 16 layers) and the LM head
once, bf16, weights in `F.linear`'s layout (out, in); all layers' products recorded in one
CUDA graph (each layer its own weights, so nothing is served from L2) and replayed. The
bound: the weights' bytes at the memory bandwidth.

    python -m bench.probe.fused_products --shape llama-1b --rows 64 256 --out bench/results/fused_products.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness.hardware import bandwidth
from bench.harness.report import RESULTS, versions, write_json
from bench.harness.shapes import SHAPES, model_config
from bench.harness.timing import graph_replay_ms


def layer_weights(hidden: int, q_out: int, kv_out: int, inter: int, layers: int):
    """Each layer's (q, k, v, o, gate, up, down) weights and their fused (qkv, o, gate_up,
    down) copies, all (out, in), bf16 on the GPU."""
    dt, dev = torch.bfloat16, "cuda"
    made = []
    for _ in range(layers):
        q, k, v = (torch.randn(n, hidden, device=dev, dtype=dt) * 0.02 for n in (q_out, kv_out, kv_out))
        o = torch.randn(hidden, q_out, device=dev, dtype=dt) * 0.02
        gate, up = (torch.randn(inter, hidden, device=dev, dtype=dt) * 0.02 for _ in range(2))
        down = torch.randn(hidden, inter, device=dev, dtype=dt) * 0.02
        made.append({"q": q, "k": k, "v": v, "o": o, "gate": gate, "up": up, "down": down,
                     "qkv": torch.cat([q, k, v]), "gate_up": torch.cat([gate, up])})
    return made


def separate(x, a, h, w):
    return (F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"]), F.linear(a, w["o"]),
            F.linear(x, w["gate"]), F.linear(x, w["up"]), F.linear(h, w["down"]))


def fused(x, a, h, w):
    return F.linear(x, w["qkv"]), F.linear(a, w["o"]), F.linear(x, w["gate_up"]), F.linear(h, w["down"])


def time_graph(fn, layers, x, a, h, head) -> float:
    """Milliseconds of one replay of every layer's products and the LM head, as a CUDA graph."""
    return graph_replay_ms(lambda: [fn(x, a, h, w) for w in layers] + [F.linear(x, head)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--shape", default="llama-1b", choices=[n for n, s in SHAPES.items() if s.family == "llama"])
    parser.add_argument("--out", default=str(RESULTS / "fused_products.json"))
    args = parser.parse_args()
    config = model_config(args.shape)
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    dim, inter, n_layers, vocab = hidden // heads, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    layers = layer_weights(hidden, heads * dim, kv_heads * dim, inter, n_layers)
    head = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    weight_bytes = 2 * (n_layers * (2 * hidden * heads * dim + 2 * hidden * kv_heads * dim + 3 * hidden * inter)
                        + vocab * hidden)
    bound = 1e3 * weight_bytes / bandwidth()
    report = {"benchmark": "decode step's weight products, separate against fused",
              "device": torch.cuda.get_device_name(0), "versions": versions(),
              "command": "python -m bench.probe.fused_products", "settings": vars(args),
              "weights_bound_ms": round(bound, 4), "results": []}
    for rows in args.rows:
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(rows, heads * dim, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
        w = layers[0]
        got, want = fused(x, a, h, w), separate(x, a, h, w)
        error = max(float((got[0] - torch.cat(want[:3], -1)).abs().max()),
                    float((got[2] - torch.cat(want[4:6], -1)).abs().max()))
        for name, fn in (("separate", separate), ("fused", fused)):
            ms = time_graph(fn, layers, x, a, h, head)
            row = {"rows": rows, "products": name, "ms": round(ms, 4), "share_of_bound": round(bound / ms, 3),
                   "max_difference_from_separate": error if name == "fused" else 0.0}
            print(row, flush=True)
            report["results"].append(row)
    write_json(report, Path(args.out))


if __name__ == "__main__":
    main()
