"""HF PEFT's adapter folders for prompt learning: import into softprompt, export from it.

A PEFT prompt-learning adapter is ``adapter_config.json`` plus ``adapter_model.safetensors``
holding one tensor, ``prompt_embeddings``:

* ``PROMPT_TUNING`` and ``P_TUNING``: (P, D), the virtual tokens' input embeddings, put in
  front of the whole input (for P-tuning, the prompt encoder's output: what PEFT uses when it
  loads the adapter for inference);
* ``PREFIX_TUNING``: (P, L * 2 * H_kv * D_head), each layer's prefix keys then values (the
  projection's output when ``prefix_projection`` is on).

That is exactly softprompt's collapsed inference tensor, laid out differently, for the
templates PEFT can express: ``[P:n] {text}`` (input methods) and ``{text}`` (deep ones), on
a causal LM (``CAUSAL_LM``), and deep prompts on an encoder (``FEATURE_EXTRACTION``).
Anything else has no PEFT equivalent and is refused with the reason, rather than written
as something that would behave differently: virtual tokens inside a template, anchor words,
an answer slot, input prompts on encoders (PEFT puts them before [CLS]) and any prompt on an
encoder-decoder (PEFT puts it in the decoder too), an adapter with trained head weights.

No dependency on the ``peft`` package: the format is read and written here (the tests load
what we write with PEFT itself and compare logits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .architecture import ModelKind, model_spec
from .errors import ConfigError, PromptFileError
from .io import load_tensors, read_json_object, write_directory_atomically
from .methods import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from .methods.collapsed import CollapsedPrompt

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
IMPORTED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT adapter folder, checked for what import needs."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PromptFileError(f"{path}: missing (not a PEFT adapter folder)")
    data = read_json_object(path)
    kind = data.get("peft_type")
    if kind not in IMPORTED:
        raise PromptFileError(f"{path}: field 'peft_type' is {kind!r}; softprompt imports the prompt-learning "
                              f"adapters {', '.join(IMPORTED)} (LoRA and other weight adapters change the base model)")
    for name in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
        value = data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PromptFileError(f"{path}: field {name!r} must be a positive integer, got {value!r}")
    submodules = data.get("num_transformer_submodules", 1)
    if submodules not in (1, None):
        raise PromptFileError(f"{path}: field 'num_transformer_submodules' is {submodules}: the adapter puts prompts "
                              "in an encoder-decoder's decoder too, which softprompt does not do")
    task = data.get("task_type")
    if task not in TASK_TYPES:
        raise PromptFileError(f"{path}: field 'task_type' is {task!r}; import supports {', '.join(map(str, TASK_TYPES))}")
    return data


def import_peft(directory: str | os.PathLike, base, tokenizer=None):
    """A PEFT prompt-learning adapter as a `SoftPromptModel` on `base` (collapsed: it
    serves, evaluates and saves; it gives the logits PEFT gives with the adapter).

    Args:
        directory: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
        base: the causal LM the adapter was trained on.

    Raises:
        PromptFileError: not a PEFT prompt-learning adapter, a corrupt file, or a field out
            of range (the file and field are named).
        BaseModelMismatchError: the adapter's sizes differ from `base`'s (what differs is named).
    """
    from .errors import BaseModelMismatchError
    from .model import SoftPromptModel

    directory = Path(directory)
    data = read_adapter_config(directory)
    spec = model_spec(base)
    P, kind = data["num_virtual_tokens"], data["peft_type"]
    deep = kind == "PREFIX_TUNING"
    _check_placement(spec, deep, f"{directory / CONFIG_FILE}: {kind}")
    expected = ({"token_dim": spec.num_key_value_heads * spec.head_dim, "num_attention_heads": spec.num_key_value_heads,
                 "num_layers": spec.num_layers} if deep else {"token_dim": spec.hidden_size, "num_layers": spec.num_layers})
    differences = [f"{k}: adapter {data[k]}, base {v}" for k, v in expected.items() if data[k] != v]
    if differences:
        raise BaseModelMismatchError(f"{directory} was trained on another base model "
                                     f"({data.get('base_model_name_or_path') or 'unnamed'}): " + "; ".join(differences))
    tensors = load_tensors(directory / WEIGHTS_FILE)
    others = sorted(k for k in tensors if k != "prompt_embeddings")
    if others:
        raise PromptFileError(f"{directory / WEIGHTS_FILE}: holds more than the prompt ({', '.join(others[:4])}): "
                              "weights PEFT trained beside it (a task head, modules_to_save) have no place in a "
                              "softprompt prompt; import an adapter of the prompt alone")
    table = tensors.get("prompt_embeddings")
    width = spec.num_layers * 2 * data["token_dim"] if deep else data["token_dim"]
    if table is None or tuple(table.shape) != (P, width):
        raise PromptFileError(f"{directory / WEIGHTS_FILE}: expected a tensor 'prompt_embeddings' of shape {(P, width)}, "
                              f"found {None if table is None else tuple(table.shape)}")
    table = table.float()
    if deep:
        # (P, L * 2 * H_kv * D_head) -> (L, 2, H_kv, P, D_head)
        table = table.view(P, spec.num_layers, 2, spec.num_key_value_heads, spec.head_dim).permute(1, 2, 3, 0, 4).contiguous()
        config = PrefixTuningConfig(num_virtual_tokens=P, projection=bool(data.get("prefix_projection")),
                                    **({"projection_hidden_size": data["encoder_hidden_size"]}
                                       if data.get("prefix_projection") and data.get("encoder_hidden_size") else {}))
    elif kind == "P_TUNING":
        encoder = str(data.get("encoder_reparameterization_type", "MLP")).lower()
        config = PTuningConfig(template=f"[P:{P}] {{text}}", encoder=encoder if encoder in ("lstm", "mlp") else "mlp")
    else:
        config = PromptTuningConfig(num_virtual_tokens=P)
    device = base.get_input_embeddings().weight.device
    prompt = CollapsedPrompt(table.to(device), spec, deep=deep)
    return SoftPromptModel(base, config, tokenizer, prompt=prompt)


def export_peft(model, directory: str | os.PathLike) -> None:
    """Write `model`'s prompt as a PEFT adapter folder that `PeftModel.from_pretrained`
    loads (for inference: PEFT then uses the saved tensor as it is) with our logits.

    Raises:
        ConfigError: the prompt uses something PEFT cannot express (named).
    """
    spec = model.spec
    method = model.config.method
    _check_placement(spec, model.deep, f"{method} prompt")
    P = model.num_virtual_tokens
    template = model.template.source
    plain = "{text}" if model.deep else f"[P:{P}] {{text}}"
    if " ".join(template.split()) != plain:
        raise ConfigError(f"template {template!r} has no PEFT equivalent: PEFT puts all virtual tokens in front of "
                          f"the input with nothing else around it (the template {plain!r})")
    tensor = model.export().cpu()  # (P, D) or (L, 2, H_kv, P, D_head)
    name = getattr(model.base.config, "_name_or_path", "") or None
    task_type = "CAUSAL_LM" if spec.kind is ModelKind.CAUSAL else "FEATURE_EXTRACTION"
    common = {"task_type": task_type, "num_virtual_tokens": P, "num_transformer_submodules": 1,
              "num_layers": spec.num_layers, "base_model_name_or_path": name, "inference_mode": True,
              "revision": None, "auto_mapping": None, "modules_to_save": None}
    if model.deep:
        L, _, H, _, Dh = tensor.shape
        table = tensor.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * Dh)
        config = {**common, "peft_type": "PREFIX_TUNING", "token_dim": H * Dh, "num_attention_heads": H,
                  "prefix_projection": bool(getattr(model.config, "projection", False)),
                  "encoder_hidden_size": getattr(model.config, "projection_hidden_size", None)}
    elif method == "p-tuning":
        table = tensor
        config = {**common, "peft_type": "P_TUNING", "token_dim": spec.hidden_size,
                  "num_attention_heads": _attention_heads(model.base),
                  "encoder_reparameterization_type": model.config.encoder.upper(),
                  "encoder_hidden_size": model.config.encoder_hidden_size or spec.hidden_size,
                  "encoder_num_layers": 2, "encoder_dropout": model.config.encoder_dropout}
    else:
        table = tensor
        config = {**common, "peft_type": "PROMPT_TUNING", "token_dim": spec.hidden_size,
                  "num_attention_heads": _attention_heads(model.base), "prompt_tuning_init": "RANDOM",
                  "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({"prompt_embeddings": table.float().contiguous()}, str(tmp / WEIGHTS_FILE))

    write_directory_atomically(Path(directory), write)


def _check_placement(spec, deep: bool, what: str) -> None:
    """Where PEFT and softprompt put the same prompt: everything on a causal LM; on an encoder,
    deep prompts only (PEFT puts input prompts before [CLS], our templates after it); never
    on an encoder-decoder (PEFT puts prompt-tuning prompts in the decoder's input too, and a
    prefix in the decoder only, where ours spans encoder and decoder)."""
    if spec.kind is ModelKind.SEQ2SEQ:
        raise ConfigError(f"{what}: on an encoder-decoder ({spec.model_type}) PEFT places prompts in the decoder "
                          "(input prompts in both stacks, prefixes in the decoder only) and softprompt does not: "
                          "no equivalent to convert")
    if spec.kind is ModelKind.ENCODER and not deep:
        raise ConfigError(f"{what}: on an encoder ({spec.model_type}) PEFT puts input prompts before [CLS] and "
                          "softprompt's templates after it: no equivalent to convert (deep prompts convert)")


def _attention_heads(base) -> int:
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))


__all__ = ["import_peft", "export_peft", "read_adapter_config"]
