"""Which SDPA backends give NaN gradients for left-padded rows (query rows that attend to no
key) on this GPU: a 4-layer Llama stack of SmolLM2-135M's width in bf16, batch 32, lengths
35-256, left vs right padding, each backend forced with `torch.nn.attention.sdpa_kernel`.

    python bench/sdpa_nan_probe.py --out bench/results/sdpa_nan_probe.json      # on a GPU

Why softprompt's training forwards leave the cuDNN backend out: src/softprompt/attention.py.
"""
import argparse
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, versions, write_json  # noqa: E402
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, default=RESULTS / "sdpa_nan_probe.json")
args = parser.parse_args()
rows = []
from torch.nn.attention import sdpa_kernel, SDPBackend
from transformers import LlamaConfig, LlamaModel
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                  vocab_size=1000, attn_implementation="sdpa")
m = LlamaModel(cfg).cuda().to(torch.bfloat16)
for side in ("left", "right"):
    for S in (35, 55, 64, 100, 192, 256):
        B = 32
        lengths = torch.randint(S - 9, S + 1, (B,))
        mask = torch.zeros(B, S, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            if side == "left": mask[i, S - n:] = 1
            else: mask[i, :n] = 1
        mask = mask.cuda()
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)):
            x = (torch.randn(B, S, 576, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
            try:
                ctx = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
                with ctx:
                    h = m(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
                    last = h[:, -1] if side == "left" else h[torch.arange(B), mask.sum(1) - 1]
                    last.float().pow(2).sum().backward()
                real = mask.bool()
                row = {"padding": side, "length": S, "backend": name, "output_nan_real": bool(h[real].isnan().any()),
                       "output_nan_pad": bool(h[~real].isnan().any()), "grad_nan_real": bool(x.grad[real].isnan().any())}
            except Exception as e:
                row = {"padding": side, "length": S, "backend": name, "error": str(e)[:200]}
            rows.append(row)
            print(row, flush=True)
write_json({"benchmark": "sdpa_nan_probe", "device": torch.cuda.get_device_name(0), "versions": versions(),
            "cudnn": torch.backends.cudnn.version(), "rows": rows}, args.out)
