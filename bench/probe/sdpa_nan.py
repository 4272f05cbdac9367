"""Which SDPA backends give NaN gradients for left-padded rows (query rows that attend to no
key) on this GPU: a 4-layer Llama stack of SmolLM2-135M's width in bf16, batch 32, lengths
35-256, left vs right padding, each backend forced with `torch.nn.attention.sdpa_kernel`.

    python -m bench.probe.sdpa_nan --out bench/results/sdpa_nan_probe.json      # on a GPU

Why softprompt's training forwards leave the cuDNN backend out: src/softprompt/attention.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.harness.report import RESULTS, versions, write_json
from bench.harness.shapes import model_config

LENGTHS = (35, 55, 64, 100, 192, 256)
B = 32


def padding_mask(side: str, S: int, device: str) -> torch.Tensor:
    """(B, S) attention mask of B rows of S-9 to S real tokens, padded on `side`."""
    lengths = torch.randint(S - 9, S + 1, (B,))
    mask = torch.zeros(B, S, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        if side == "left":
            mask[i, S - n :] = 1
        else:
            mask[i, :n] = 1
    return mask.to(device)


def probe(model, mask: torch.Tensor, side: str, name: str, backend) -> dict:
    """One forward + backward with `backend` forced (None: torch's choice): NaNs in the
    outputs of real and pad positions, in the input gradient of real positions."""
    from torch.nn.attention import sdpa_kernel

    S = mask.shape[1]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    x = (torch.randn(B, S, 576, device=mask.device) * 0.02).to(torch.bfloat16).requires_grad_(True)
    try:
        with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
            h = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
            last = h[:, -1] if side == "left" else h[torch.arange(B), mask.sum(1) - 1]
            last.float().pow(2).sum().backward()
        real = mask.bool()
        return {"padding": side, "length": S, "backend": name, "output_nan_real": bool(h[real].isnan().any()),
                "output_nan_pad": bool(h[~real].isnan().any()), "grad_nan_real": bool(x.grad[real].isnan().any())}
    except Exception as e:  # noqa: BLE001 - a backend this device lacks is a row, not the end
        return {"padding": side, "length": S, "backend": name, "error": str(e)[:200]}


def main() -> None:
    from torch.nn.attention import SDPBackend
    from transformers import LlamaModel

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--out", type=Path, default=RESULTS / "sdpa_nan_probe.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = model_config("smollm2-135m", num_hidden_layers=4, vocab_size=1000, attn_implementation="sdpa")
    model = LlamaModel(config).to(device).to(torch.bfloat16)
    backends = (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("math", SDPBackend.MATH))
    rows = []
    for side in ("left", "right"):
        for S in args.lengths:
            mask = padding_mask(side, S, device)
            for name, backend in backends:
                rows.append(probe(model, mask, side, name, backend))
                print(rows[-1], flush=True)
    write_json({"benchmark": "sdpa_nan_probe", "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
                "versions": versions(), "cudnn": torch.backends.cudnn.version(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
