"""What softprompt needs to know about a frozen base model, read from its config.

Everything model-family specific that is *not* about injecting tensors lives here:
the kind of model (causal LM, encoder, encoder-decoder), the shape of one layer's
key/value cache, the position limits and the identity used to refuse a prompt saved
for another base model; `OnBase`, what a model on the base reads off it alone (device,
``logits_to_keep``, padding side).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import weakref
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from torch import nn

from .errors import UnsupportedModelError


class ModelKind(str, Enum):
    CAUSAL = "causal"  # decoder-only LM: GPT-2, Llama, Qwen2, Mistral, ...
    ENCODER = "encoder"  # bidirectional encoder: BERT, RoBERTa, ...
    SEQ2SEQ = "seq2seq"  # encoder-decoder: T5, BART, ...


# Encoder-decoder families whose *encoder* self-attention takes no cache through the
# public forward; deep prompts reach it through a pre-hook (see inject.py), which
# needs to know where the self-attention modules are.
_ENCODER_SELF_ATTENTION = {
    "t5": lambda enc: [block.layer[0].SelfAttention for block in enc.block],
    "mt5": lambda enc: [block.layer[0].SelfAttention for block in enc.block],
    "bart": lambda enc: [layer.self_attn for layer in enc.layers],
    "mbart": lambda enc: [layer.self_attn for layer in enc.layers],
}
# Families whose learned position table is offset by padding_idx + 1 (fairseq lineage).
_POSITION_OFFSET_BY_PADDING = {"roberta", "xlm-roberta", "camembert"}
# Families whose positions are relative: no maximum-position limit.
_RELATIVE_POSITIONS = {"t5", "mt5"}


@dataclass(frozen=True)
class BaseIdentity:
    """The identity of a base model, stored with every saved prompt.

    Loading a prompt onto a base whose identity differs is refused with the fields that
    differ; `embedding_fingerprint` catches same-shaped models with other weights.
    """

    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    embedding_fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: "BaseIdentity") -> list[str]:
        """Human-readable list of fields that differ, `saved != given`.

        The head class (`architecture`) is informative only: a prompt trained on
        `LlamaForCausalLM` serves `LlamaForSequenceClassification` of the same weights.
        """
        return [
            f"{name}: saved {getattr(self, name)!r}, given {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if name != "architecture" and getattr(self, name) != getattr(other, name)
        ]


def tensor_parallel_mesh(base: nn.Module):
    """The device mesh a base model's weights are split over by tensor parallelism
    (transformers' ``tp_plan``: DTensor weights sharded across it); None: not split."""
    if (getattr(base, "tp_size", None) or 1) <= 1:  # transformers' own mark; not split: no parameter scan
        return None
    from torch.distributed.tensor import DTensor, Shard

    for parameter in base.parameters():
        if isinstance(parameter, DTensor) and any(isinstance(p, Shard) for p in parameter.placements):
            return parameter.device_mesh
    return None


def whole_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A weight as one tensor: one split by tensor parallelism (a DTensor) gathered, so that
    what is computed from it (a prompt's initialisation, the fingerprint) is what the
    whole base gives."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 over a fixed sample of the input-embedding matrix (fp32 bytes).

    Hashing all of a 128k x 4096 table would cost seconds; 64 evenly spaced rows are
    enough to tell two checkpoints apart and cost nothing.
    """
    weight = whole_tensor(weight)
    rows = torch.linspace(0, weight.shape[0] - 1, steps=min(64, weight.shape[0])).long()
    sample = weight.detach()[rows.to(weight.device)].float().cpu().contiguous()
    digest = hashlib.sha256(sample.numpy().tobytes())
    digest.update(str(tuple(weight.shape)).encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and conventions of one base model.

    Attributes:
        kind: causal LM, encoder or encoder-decoder.
        hidden_size: D, the width of the input embeddings.
        num_layers: layers of one stack (decoder for causal, encoder for encoder models).
        num_decoder_layers: decoder layers of an encoder-decoder (0 otherwise).
        num_key_value_heads: H_kv of one layer's cache (GQA models: fewer than heads).
        head_dim: D_head of one key/value head.
        max_positions: most positions the model can take, or None (relative positions).
        position_offset: added to 0-based position ids (RoBERTa counts from pad + 1).
        accepts_position_ids: False where positions follow the layout (T5, BART).
        deep_layers: L of a deep prompt: every self-attention stack that takes a prefix.
        sliding_window_layers: a causal LM whose cache has sliding-window layers (they trim
            what they keep, so a deep prefix goes through the generation cache).
    """

    kind: ModelKind
    model_type: str
    hidden_size: int
    num_layers: int
    num_decoder_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    position_offset: int
    accepts_position_ids: bool
    sliding_window_layers: bool = False

    @property
    def deep_layers(self) -> int:
        return self.num_layers + self.num_decoder_layers

    @property
    def encoder_self_attention(self):
        return _ENCODER_SELF_ATTENTION.get(self.model_type)


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_kind(base: nn.Module) -> ModelKind:
    config = base.config
    if getattr(config, "is_encoder_decoder", False):
        return ModelKind.SEQ2SEQ
    name = type(base).__name__
    if name.endswith("ForCausalLM") or (name.endswith("LMHeadModel") and not name.startswith("Bert")):
        return ModelKind.CAUSAL
    if getattr(config, "is_decoder", False):
        return ModelKind.CAUSAL
    decoder_only = {"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt", "falcon", "gptj"}
    if config.model_type in decoder_only:
        return ModelKind.CAUSAL
    return ModelKind.ENCODER


def text_config(config, decoder: bool = False):
    """The configuration of a model's text stack (a multimodal config's language model's, a
    plain model's own), where its sizes and score scalings are read."""
    if not hasattr(config, "get_text_config"):
        return config
    return config.get_text_config(decoder=True) if decoder else config.get_text_config()


def model_spec(base: nn.Module) -> ModelSpec:
    """Read a `ModelSpec` from a transformers model.

    Raises:
        UnsupportedModelError: the config lacks the fields needed to shape prompts.
    """
    config = base.config
    kind = model_kind(base)
    text = text_config(config, decoder=True)
    hidden = _first(text, "hidden_size", "d_model", "n_embd")
    heads = _first(text, "num_attention_heads", "num_heads", "n_head", "encoder_attention_heads")
    if hidden is None or heads is None:
        raise UnsupportedModelError(
            f"{type(base).__name__}: config has no hidden size / attention heads; cannot shape a prompt for it"
        )
    kv_heads = _first(text, "num_key_value_heads", default=heads)
    head_dim = _first(text, "head_dim", "d_kv", default=hidden // heads)
    model_type = config.model_type
    if kind is ModelKind.SEQ2SEQ:
        enc_layers = _first(config, "encoder_layers", "num_layers")
        dec_layers = _first(config, "decoder_layers", "num_decoder_layers", default=enc_layers)
        enc_heads = _first(config, "encoder_attention_heads", "num_heads")
        dec_heads = _first(config, "decoder_attention_heads", "num_heads")
        if enc_heads != dec_heads:
            raise UnsupportedModelError(
                f"{model_type}: encoder has {enc_heads} heads and decoder {dec_heads}; "
                "a deep prompt [L, 2, H_kv, P, D_head] needs one head count"
            )
    else:
        enc_layers = _first(text, "num_hidden_layers", "num_layers", "n_layer")
        dec_layers = 0
    if model_type in _RELATIVE_POSITIONS:
        max_positions = None
    else:
        max_positions = _first(config, "max_position_embeddings", "n_positions", "n_ctx")
    offset = 0
    if model_type in _POSITION_OFFSET_BY_PADDING:
        pad = config.pad_token_id if config.pad_token_id is not None else 1
        offset = pad + 1
        if max_positions is not None:
            max_positions -= offset
    return ModelSpec(
        kind=kind,
        model_type=model_type,
        hidden_size=int(hidden),
        num_layers=int(enc_layers),
        num_decoder_layers=int(dec_layers),
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(base.get_input_embeddings().weight.shape[0]),
        max_positions=None if max_positions is None else int(max_positions),
        position_offset=offset,
        # Families without `position_ids` (T5, BART) place tokens by row layout: they are
        # always right-padded.
        accepts_position_ids=forward_accepts(base, "position_ids"),
        sliding_window_layers=kind is ModelKind.CAUSAL and _has_sliding_layers(config),
    )


def _has_sliding_layers(config) -> bool:
    """Whether transformers builds sliding-window cache layers for this model config (read
    once here: building the cache to find out costs a cache per layer)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers)


def forward_accepts(base: nn.Module, name: str) -> bool:
    """Whether `base`'s forward takes the keyword argument `name`: named by the head class's
    forward (``logits_to_keep``), or by its body's (`base.base_model`) for what a head class
    hands on through ``**kwargs`` (a cache, position ids). The one such probe of the
    package; read once per class."""
    return _forward_takes(type(base), type(getattr(base, "base_model", base)), name)


@functools.lru_cache(maxsize=None)
def _forward_takes(head: type, body: type, name: str) -> bool:
    return any(name in inspect.signature(cls.forward).parameters for cls in (head, body))


class OnBase:
    """What a model on a frozen base reads off the base alone (its `base` and `spec`):
    `SoftPromptModel`, and the prompt-less `serve.entry.PlainBase` that serves the base
    under its own name."""

    base: nn.Module
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    @property
    def keeps_logits(self) -> bool:
        """Whether the base applies its LM head only at the columns named by
        ``logits_to_keep`` (causal LMs of transformers 5): (B, S, V) logits are the largest
        tensor of a step otherwise, and serving asks for one column or the answer's."""
        return self.spec.kind is ModelKind.CAUSAL and forward_accepts(self.base, "logits_to_keep")

    @property
    def padding_side(self) -> str:
        """Default padding: left for causal LMs (generation continues at the end of
        every row), right for the rest; families that take no position ids are always
        right-padded."""
        return "left" if self.spec.kind is ModelKind.CAUSAL and self.spec.accepts_position_ids else "right"


# A split base's identity, by base. Its fingerprint gathers the embedding (a collective), so
# it is computed once, by every process at once (`serve.launch`, `SoftPromptModel`), and
# prompt folders read onto the base later (a served task, read on one process alone) run none.
_SPLIT_IDENTITIES: "weakref.WeakKeyDictionary[nn.Module, BaseIdentity]" = weakref.WeakKeyDictionary()


def base_identity(base: nn.Module, spec: ModelSpec | None = None) -> BaseIdentity:
    split = tensor_parallel_mesh(base) is not None
    if split and base in _SPLIT_IDENTITIES:
        return _SPLIT_IDENTITIES[base]
    spec = spec or model_spec(base)
    archs = getattr(base.config, "architectures", None) or [type(base).__name__]
    identity = BaseIdentity(
        architecture=type(base).__name__ if not archs else archs[0],
        model_type=spec.model_type,
        hidden_size=spec.hidden_size,
        num_layers=spec.deep_layers,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        embedding_fingerprint=embedding_fingerprint(base.get_input_embeddings().weight),
    )
    if split:
        _SPLIT_IDENTITIES[base] = identity
    return identity
