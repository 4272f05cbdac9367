"""HF PEFT's adapter folders for prompt learning: import into softprompt, export from it.

A PEFT prompt-learning adapter is ``adapter_config.json`` plus ``adapter_model.safetensors``
holding one tensor, ``prompt_embeddings``:

* ``PROMPT_TUNING`` and ``P_TUNING``: (P * n, D), the virtual tokens' input embeddings (for
  P-tuning, the prompt encoder's output: what PEFT uses when it loads the adapter for
  inference). n is ``num_transformer_submodules``: 1, or 2 by default for ``SEQ_2_SEQ_LM``;
  PEFT 0.21 reads only the first P rows for these two methods, in ``forward`` and in
  ``generate`` alike, and puts them in front of the encoder's input (the decoder gets none);
* ``PREFIX_TUNING``: (P, L * 2 * H_kv * D_head), each layer's prefix keys then values (the
  projection's output when ``prefix_projection`` is on).

PEFT puts input prompts in front of the tokenized input, before the tokenizer's leading
special tokens ([CLS], <s>, BOS): softprompt's template ``[P:n] [START] {text}`` (the same
row as ``[P:n] {text}`` when the tokenizer has no leading special token). With that, the
collapsed inference tensors correspond exactly:

| base            | PEFT task_type      | input prompts (prompt / P-tuning) | deep prompts (prefix / P-tuning v2) |
|-----------------|---------------------|-----------------------------------|-------------------------------------|
| causal LM       | CAUSAL_LM           | converts                          | converts                            |
| encoder         | FEATURE_EXTRACTION  | converts                          | converts                            |
| encoder-decoder | SEQ_2_SEQ_LM        | converts (encoder input)          | refused (see `_SEQ2SEQ_PREFIX`)     |

Anything else has no PEFT equivalent and is refused with the reason, rather than written as
something that would behave differently: virtual tokens inside a template, anchor words, an
answer slot, virtual tokens after the leading special tokens, deep prompts on an
encoder-decoder, an adapter with trained head weights.

No dependency on the ``peft`` package: the format is read and written here (the tests load
what we write with PEFT itself and compare logits). Which PEFT config field is which of ours
is `methods.peft_names`' table, also read by the configs for PEFT's keyword names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .architecture import ModelKind, model_spec, text_config
from .base_models import hub_id
from .encode import special_frame
from .peft_layout import peft_layout
from .errors import BaseModelMismatchError, ConfigError, PromptFileError
from .io.atomic import load_tensors, read_json_object, write_directory_atomically
from .methods import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, peft_names
from .methods.collapsed import CollapsedPrompt
from .model import SoftPromptModel
from .template import START, Template

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
IMPORTED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")

# Why a prefix-tuning adapter on an encoder-decoder has no softprompt equivalent, by
# num_transformer_submodules (read from PEFT 0.21's get_prompt and checked numerically).
_SEQ2SEQ_PREFIX = {
    2: ("PEFT gives the encoder no prefix, and gives decoder self-attention layer j the adapter's layer slot "
        "2j mod num_layers (the other slots go to the cross-attention cache, which PEFT then discards), where "
        "softprompt's deep prompt puts a prefix in every self-attention layer of the encoder and of the decoder"),
    1: ("PEFT hands the decoder one plain cache that its cross-attention layers also append the encoder's keys to "
        "(decoder layer j then cross-attends to the prefix and to the decoder's own tokens too), where softprompt's "
        "deep prompt puts a prefix in every self-attention layer of the encoder and of the decoder"),
}


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
    task = data.get("task_type")
    if task not in TASK_TYPES:
        raise PromptFileError(f"{path}: field 'task_type' is {task!r}; import supports {', '.join(map(str, TASK_TYPES))}")
    submodules = data.get("num_transformer_submodules") or 1
    if submodules not in (1, 2) or (submodules == 2 and task != "SEQ_2_SEQ_LM"):
        raise PromptFileError(f"{path}: field 'num_transformer_submodules' is {submodules} with task_type {task!r}: "
                              "PEFT uses 2 only for an encoder-decoder (SEQ_2_SEQ_LM), 1 otherwise")
    return data


def import_peft(directory: str | os.PathLike, base, tokenizer=None):
    """A PEFT prompt-learning adapter as a `SoftPromptModel` on `base` (collapsed: it
    serves, evaluates and saves; it gives the logits PEFT gives with the adapter).

    Args:
        directory: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
        base: the model the adapter was trained on (causal LM, encoder or encoder-decoder).
        tokenizer: the base model's tokenizer; it tells whether the imported template needs
            ``[START]`` (PEFT's prompts come before the leading special tokens).

    Raises:
        PromptFileError: not a PEFT prompt-learning adapter, a corrupt file, or a field out
            of range (the file and field are named).
        BaseModelMismatchError: the adapter's sizes differ from `base`'s (what differs is named).
    """
    directory = Path(directory)
    data = read_adapter_config(directory)
    spec = model_spec(base)
    P, kind = data["num_virtual_tokens"], data["peft_type"]
    deep = kind == "PREFIX_TUNING"
    where = f"{directory / CONFIG_FILE}: {kind}"
    if (data.get("task_type") == "SEQ_2_SEQ_LM") != (spec.kind is ModelKind.SEQ2SEQ):
        what = "an encoder-decoder" if spec.kind is ModelKind.SEQ2SEQ else "not an encoder-decoder"
        raise PromptFileError(f"{where}: field 'task_type' is {data.get('task_type')!r} but the base model "
                              f"({spec.model_type}) is {what}: PEFT's SEQ_2_SEQ_LM adapters go with encoder-decoders, "
                              "and only they")
    if data.get("task_type") == "CAUSAL_LM" and spec.kind is not ModelKind.CAUSAL:
        raise PromptFileError(f"{where}: field 'task_type' is 'CAUSAL_LM' but the base model ({spec.model_type}) is "
                              f"not a causal LM: the adapter was trained on another base model")
    submodules = data.get("num_transformer_submodules") or 1
    if deep and spec.kind is ModelKind.SEQ2SEQ:
        raise PromptFileError(f"{where} with num_transformer_submodules {submodules} on an encoder-decoder "
                              f"({spec.model_type}): {_SEQ2SEQ_PREFIX[submodules]}: no equivalent to import")
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
    rows = P if deep else P * submodules  # prefix tuning saves P rows whatever the submodules
    if table is None or tuple(table.shape) != (rows, width):
        raise PromptFileError(f"{directory / WEIGHTS_FILE}: expected a tensor 'prompt_embeddings' of shape {(rows, width)}, "
                              f"found {None if table is None else tuple(table.shape)}")
    # With 2 submodules PEFT trains and saves 2P input rows but its forward and generate put
    # only the first P in front of the encoder's input (the rest never reach the model).
    table = table[:P].float()
    if deep:
        # (P, L * 2 * H_kv * D_head) -> (L, 2, H_kv, P, D_head)
        table = table.view(P, spec.num_layers, 2, spec.num_key_value_heads, spec.head_dim).permute(1, 2, 3, 0, 4).contiguous()
        fields = peft_names.from_adapter(PrefixTuningConfig, data)
        if not fields.get("projection"):  # PEFT's encoder_hidden_size sized a projection it did not build
            fields.pop("projection_hidden_size", None)
        config = PrefixTuningConfig(**{**fields, "projection": bool(fields.get("projection"))})
    elif kind == "P_TUNING":
        config = PTuningConfig(template=peft_template(P, tokenizer), **peft_names.from_adapter(PTuningConfig, data))
    else:
        # the init is history (the table is trained) and PEFT's TEXT init named a tokenizer we do not load
        config = PromptTuningConfig(num_virtual_tokens=P, template=peft_template(P, tokenizer))
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
    if model.export_input_delta() is not None:
        raise ConfigError(f"{method} prompt: PEFT has no DePT (no method adds a low-rank update to the input "
                          "embeddings beside a prompt), so it has no adapter to export to; serve the folder with "
                          "softprompt, or train prompt-tuning for a PEFT adapter")
    if model.deep and spec.kind is ModelKind.SEQ2SEQ:
        raise ConfigError(f"{method} prompt on an encoder-decoder ({spec.model_type}): PEFT's SEQ_2_SEQ_LM prefix "
                          f"tuning has no equivalent ({_SEQ2SEQ_PREFIX[2]})")
    P = model.num_virtual_tokens
    _check_template(model.template, P, model.deep, model.tokenizer)
    tensor = model.export().cpu()  # (P, D) or (L, 2, H_kv, P, D_head)
    # PEFT's AutoPeftModel loads the base by this name: an alias means nothing to it, so the
    # upstream Hub id goes there (a local path stays: it loads where it was made).
    name = getattr(model.base.config, "_name_or_path", "") or None
    name = hub_id(name) or name
    task_type = {ModelKind.CAUSAL: "CAUSAL_LM", ModelKind.ENCODER: "FEATURE_EXTRACTION",
                 ModelKind.SEQ2SEQ: "SEQ_2_SEQ_LM"}[spec.kind]
    # One submodule: the P rows in front of the encoder's input are all PEFT reads of an
    # input prompt on an encoder-decoder (its default 2 would ask for P more, never read).
    common = {**peft_names.to_peft(model.config, spec.hidden_size),
              "task_type": task_type, "num_virtual_tokens": P, "num_transformer_submodules": 1,
              "num_layers": spec.num_layers, "base_model_name_or_path": name, "inference_mode": True,
              "revision": None, "auto_mapping": None, "modules_to_save": None}
    if model.deep:
        L, _, H, _, Dh = tensor.shape
        table = tensor.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * Dh)
        config = {**common, "token_dim": H * Dh, "num_attention_heads": H}
    else:
        table = tensor
        config = {**common, "token_dim": spec.hidden_size, "num_attention_heads": _attention_heads(model.base)}
    if method == "prompt-tuning":
        # PEFT loads the saved table over its init; its TEXT init would first load a tokenizer
        # by name (one we do not record), so the adapter says RANDOM.
        config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({"prompt_embeddings": table.float().contiguous()}, str(tmp / WEIGHTS_FILE))

    write_directory_atomically(Path(directory), write)


def peft_template(num_virtual_tokens: int, tokenizer=None) -> str:
    """softprompt's template for PEFT's layout of an input prompt: the P virtual tokens in
    front of the tokenized input, before its leading special tokens. ``[P:n] {text}`` when
    the tokenizer is known to put none there (e.g. GPT-2, T5), else ``[P:n] [START] {text}``."""
    if tokenizer is not None and not special_frame(tokenizer)[0]:
        return f"[P:{num_virtual_tokens}] {{text}}"
    return f"[P:{num_virtual_tokens}] {START} {{text}}"


def _check_template(template: Template, P: int, deep: bool, tokenizer) -> None:
    """Refuse a template that PEFT's layout cannot express (see `peft_template`)."""
    layout = peft_layout(template)
    if deep:
        if layout is None:
            raise ConfigError(f"template {template.source!r} has no PEFT equivalent: PEFT's prefix sees the input with "
                              "nothing around it (the template '{text}')")
        return
    peft = f"[P:{P}] {START} {{text}}"
    if layout is None:
        raise ConfigError(f"template {template.source!r} has no PEFT equivalent: PEFT puts all virtual tokens in front "
                          f"of the input with nothing else around it (the template {peft!r})")
    if not layout.after_lead:
        return
    if tokenizer is None:
        raise ConfigError(f"template {template.source!r}: without the tokenizer it cannot be told whether the virtual "
                          "tokens follow leading special tokens ([CLS], <s>, BOS), which PEFT puts after them: "
                          "pass tokenizer=... to SoftPromptModel")
    lead = special_frame(tokenizer)[0]
    if lead:
        raise ConfigError(f"template {template.source!r} has no PEFT equivalent: it puts the virtual tokens after the "
                          f"tokenizer's leading special tokens {tokenizer.convert_ids_to_tokens(lead)}, PEFT before "
                          f"them (the template {peft!r})")


def _attention_heads(base) -> int:
    config = text_config(base.config)
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head"))


__all__ = ["import_peft", "export_peft", "read_adapter_config", "peft_template"]
