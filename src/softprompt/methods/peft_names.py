"""HF PEFT's names for the methods' configuration, and what each one is here: the one table.

PEFT configures the same methods under its own field names (``PromptEncoderConfig(
encoder_reparameterization_type="MLP")``). Per method, this table says which PEFT field is
one of ours under another name (`ALIASES`, values translated), which one names something
softprompt builds one way only (`BUILT_IN`: accepted at that value), and which one has no
place in a method config (`REFUSED`: where its meaning lives here instead). The configs read
it for keyword arguments (``PromptTuningConfig(prompt_tuning_init="TEXT", ...)``, see
`PromptConfig`), `peft_format` for ``adapter_config.json`` in and out.

A PEFT field spelled as one of ours (``num_virtual_tokens``; P-tuning's
``encoder_hidden_size`` and ``encoder_dropout``) is ours. Its meaning matches PEFT's but for
one case: PEFT's LSTM encoder is ``encoder_hidden_size`` wide *per direction*, ours in total,
so a width given beside PEFT's ``encoder_reparameterization_type="LSTM"`` is refused with the
rewrite rather than read as half of what the PEFT user meant.

What an alias carries over is the field's meaning; the modules stay softprompt's, which
differ from PEFT's in places (tests/test_peft_ergonomics.py compares the parameters built
from the same keywords with PEFT's own): P-tuning's MLP encoder has the paper's two linear layers
(PEFT's three), prompt tuning's ``"random"`` init is scaled to the vocabulary embeddings'
std (PEFT's is N(0, 1)), ``"text"`` tokenizes without special tokens (PEFT's with them), and
a projected prefix starts from a (P, D) embedding (PEFT's from (P, H_kv * D_head) on GQA models).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import ConfigError

#: PEFT's ``peft_type`` of each method (PEFT's prefix tuning without projection is P-tuning v2)
PEFT_TYPES = {"prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING", "prefix-tuning": "PREFIX_TUNING",
              "p-tuning-v2": "PREFIX_TUNING"}
_CLASSES = {"prompt-tuning": "PromptTuningConfig", "p-tuning": "PTuningConfig", "prefix-tuning": "PrefixTuningConfig",
            "p-tuning-v2": "PTuningV2Config"}


@dataclass(frozen=True)
class Alias:
    """A PEFT field that is one of ours under another name.

    Attributes:
        field: our field.
        values: PEFT's value -> ours (None: the value as it is).
    """

    field: str
    values: Mapping[Any, Any] | None = None

    def ours(self, value: Any) -> Any:
        value = getattr(value, "value", value)  # PEFT's str enums (PromptTuningInit.TEXT)
        if self.values is None:
            return value
        if not isinstance(value, str) or value not in self.values:
            raise ConfigError(f"{value!r} is not one of PEFT's values {sorted(self.values)} (softprompt: "
                              f"{self.field}={'/'.join(map(repr, self.values.values()))})")
        return self.values[value]

    def peft(self, value: Any) -> Any:
        """Our value -> PEFT's (None where PEFT has no such value)."""
        if self.values is None:
            return value
        return {v: k for k, v in self.values.items()}.get(value)


_PREFIX = {"prefix_projection": Alias("projection"), "encoder_hidden_size": Alias("projection_hidden_size")}
ALIASES: dict[str, dict[str, Alias]] = {
    "prompt-tuning": {"prompt_tuning_init": Alias("init", {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}),
                      "prompt_tuning_init_text": Alias("init_text")},
    "p-tuning": {"encoder_reparameterization_type": Alias("encoder", {"MLP": "mlp", "LSTM": "lstm"})},
    "prefix-tuning": _PREFIX,
    "p-tuning-v2": _PREFIX,
}

_TRAINABLE = ("a new prompt trains; SoftPromptModel.from_pretrained(base, folder) loads a trained one collapsed and "
              "frozen, and model.eval() turns dropout off")
_METHOD = ("the config class is the method: PROMPT_TUNING = PromptTuningConfig, P_TUNING = PTuningConfig, "
           "PREFIX_TUNING = PrefixTuningConfig (or PTuningV2Config, without projection)")
#: PEFT fields that choose what softprompt builds one way only: accepted at that value (then dropped)
BUILT_IN: dict[str, dict[str, tuple[Any, str]]] = {
    method: {"peft_type": (peft_type, _METHOD), "inference_mode": (False, _TRAINABLE)}
    for method, peft_type in PEFT_TYPES.items()
}
BUILT_IN["p-tuning"]["encoder_num_layers"] = (2, ("softprompt's LSTM encoder has the paper's 2 layers (PEFT's "
                                                  "default); PEFT's MLP encoder ignores it"))

_FROM_BASE = "read off the base model given to SoftPromptModel: drop it"
#: PEFT fields with no place in a method config, and where their meaning lives instead (None,
#: PEFT's "unset", passes: there is nothing to carry over)
REFUSED: dict[str, str] = {
    "task_type": ("softprompt reads the kind of model (CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION) off the base model "
                  "given to SoftPromptModel, and a head (SEQ_CLS, TOKEN_CLS) is a task's "
                  "(softprompt.tasks.SequenceClassification, TokenClassification): drop it"),
    "token_dim": f"the hidden size (or H_kv * D_head of a prefix) is {_FROM_BASE}",
    "num_attention_heads": f"the attention heads are {_FROM_BASE}",
    "num_layers": f"the layers are {_FROM_BASE}",
    "num_transformer_submodules": ("an input prompt goes in front of the encoder's input of an encoder-decoder, a deep "
                                   "prompt into every self-attention layer of both stacks: drop it"),
    "base_model_name_or_path": "the base model is the model given to SoftPromptModel (e.g. softprompt.load_base(name))",
    "revision": "the base model is the model given to SoftPromptModel (e.g. softprompt.load_base(name))",
    "modules_to_save": "a trained head is a task's (softprompt.tasks), saved with the prompt by softprompt train",
    "tokenizer_name_or_path": "the tokenizer is SoftPromptModel's tokenizer=... (init_text is tokenized with it)",
    "tokenizer_kwargs": "the tokenizer is SoftPromptModel's tokenizer=... (init_text is tokenized with it)",
    "init_weights": "softprompt's prefix starts random (init_std, init_seed); PEFT's 'zero' has no counterpart",
    "auto_mapping": "PEFT's own bookkeeping: drop it",
    "peft_version": "PEFT's own bookkeeping: drop it",
}


def to_ours(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` for the config class `cls` with PEFT's names put as ours.

    Names that are neither ours nor PEFT's are left for `cls` to refuse (a ``TypeError``
    from the constructor, a `ConfigError` from ``from_dict``).

    Raises:
        ConfigError: a PEFT name with no counterpart here, or at a value that differs from
            what softprompt builds (each named with where its meaning lives); a field
            given under both names.
    """
    ours = {f.name for f in fields(cls)}
    if ours.issuperset(kwargs):
        return dict(kwargs)
    method = cls.method
    aliases, built_in = ALIASES.get(method, {}), BUILT_IN.get(method, {})
    out = {name: value for name, value in kwargs.items() if name in ours or not _peft(name, aliases, built_in)}
    problems: list[str] = []
    for name, value in kwargs.items():
        if name in aliases:
            alias = aliases[name]
            if alias.field in kwargs:
                problems.append(f"{alias.field} is given twice (also as PEFT's {name})")
            elif value is not None:  # None: PEFT's "unset", softprompt's default
                try:
                    out[alias.field] = alias.ours(value)
                except ConfigError as error:
                    problems.append(f"PEFT's {name}: {error}")
        elif name in built_in:
            if value != built_in[name][0]:
                problems.append(f"PEFT's {name}={value!r}: {built_in[name][1]}")
        elif name in REFUSED and name not in ours and value is not None:
            problems.append(f"PEFT's {name}: {REFUSED[name]}")
        elif name not in ours and name in _OTHERS:
            problems.append(f"PEFT's {name} configures {' / '.join(_OTHERS[name])}, not {cls.__name__}")
    if method == "p-tuning" and _peft_lstm(kwargs) and kwargs.get("encoder_hidden_size") is not None:
        width = kwargs["encoder_hidden_size"]
        problems.append(f"PEFT's encoder_hidden_size is its LSTM's width per direction, softprompt's counts both "
                        f"directions: for PEFT's encoder_reparameterization_type='LSTM', encoder_hidden_size={width} "
                        f"write encoder='lstm', encoder_hidden_size={2 * width if isinstance(width, int) else '2 * it'}")
    if problems:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(problems))
    return out


def from_adapter(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    """Fields of the config class `cls` from a PEFT ``adapter_config.json`` (`data`): those
    spelled as ours, and the aliased ones translated; PEFT's LSTM width doubled (a saved
    config is PEFT's throughout, so there it is not ambiguous). Every other field is the
    adapter's business (or the base model's) and dropped."""
    ours = {f.name for f in fields(cls)}
    out = {name: value for name, value in data.items() if name in ours and value is not None}
    out.update({alias.field: alias.ours(data[name]) for name, alias in ALIASES.get(cls.method, {}).items()
                if data.get(name) is not None})
    if cls.method == "p-tuning" and _peft_lstm(data) and isinstance(out.get("encoder_hidden_size"), int):
        out["encoder_hidden_size"] *= 2
    return out


def to_peft(config, hidden_size: int) -> dict[str, Any]:
    """PEFT's fields for our `config` (a method config on a base of `hidden_size`): the
    aliased ones, the built-in ones (``peft_type``, ``inference_mode``: False, P-tuning's encoder
    layers) and P-tuning's encoder width in PEFT's meaning."""
    out: dict[str, Any] = {}
    for name, alias in ALIASES.get(config.method, {}).items():
        out[name] = alias.peft(getattr(config, alias.field))
    out.update({name: fixed for name, (fixed, _) in BUILT_IN.get(config.method, {}).items()})
    if config.method == "p-tuning":
        width = config.encoder_hidden_size or hidden_size
        out["encoder_hidden_size"] = width // 2 if config.encoder == "lstm" else width
        out["encoder_dropout"] = config.encoder_dropout
    return out


def _peft_lstm(data: Mapping[str, Any]) -> bool:
    return str(getattr(data.get("encoder_reparameterization_type"), "value",
                       data.get("encoder_reparameterization_type"))).upper() == "LSTM"


def _peft(name: str, aliases: Mapping[str, Alias], built_in: Mapping[str, Any]) -> bool:
    return name in aliases or name in built_in or name in REFUSED or name in _OTHERS


def _owners() -> dict[str, list[str]]:
    """PEFT's name -> the configs that take it (named when it is given to another one)."""
    owners: dict[str, list[str]] = {"encoder_hidden_size": ["PTuningConfig"]}  # ours there, PEFT's below
    for method, names in [*ALIASES.items(), *BUILT_IN.items()]:
        for name in names:
            owners.setdefault(name, []).append(_CLASSES[method])
    return {name: classes for name, classes in owners.items() if len(classes) < len(_CLASSES)}


_OTHERS = _owners()


__all__ = ["ALIASES", "BUILT_IN", "REFUSED", "PEFT_TYPES", "Alias", "to_ours", "from_adapter", "to_peft"]
