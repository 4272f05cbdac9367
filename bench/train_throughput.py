"""Training throughput and memory: softprompt against HF PEFT and against the frozen model's floor.

    python bench/train_throughput.py --out bench/results/train_throughput.json          # on a GPU
    python bench/train_throughput.py --models tiny --shapes 2x32 --steps 2 --out /tmp/t.json   # CPU smoke run

Every row is one training step, measured in one process on one randomly initialised model
of a real shape (speed does not depend on the weights), bf16 weights, 20 virtual tokens:

  floor   the frozen model's forward + backward to its input embeddings (no weight
          gradients) over the same B x (S + 20) positions, with the same loss: what any
          soft-prompt method must at least spend.
  ours    softprompt's training step as `softprompt train` runs it: the task's loss through
          `SoftPromptModel`, backward, one read of the loss (the NaN check), gradient
          clipping at 1.0, fused AdamW; ``eager`` and ``compile`` (train.compile: the
          base's blocks compiled); ``checkpointing`` rows with train.gradient_checkpointing.
  peft    HF PEFT 0.21 with the same method and sizes (prompt encoder sizes set to PEFT's
          defaults on both sides), the same clipping and fused AdamW, no host reads; with
          and without bf16 autocast (Trainer's ``bf16=True``), the faster one is the baseline.

Losses: ``lm`` (next-token cross-entropy over every position) and ``cls`` (a verbalizer:
the label words' log-probabilities at one answer slot, the last position; the LM head
only there, for PEFT too via ``logits_to_keep=1``).
tokens/s counts the B x S real tokens of a step for every side.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, versions, write_json  # noqa: E402
from serve_throughput import tokenizer  # noqa: E402

P = 20
KEY = ("model", "batch", "seq", "loss", "side", "method", "variant", "autocast")
MODELS = {
    "gpt2-124m": ("gpt2", dict()),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                               tie_word_embeddings=True, rope_theta=500000.0)),
    "llama-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                               tie_word_embeddings=False, rope_theta=500000.0)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50304, max_position_embeddings=1024)),
}
METHODS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "prefix_tuning_noproj", "p_tuning_v2")
DEEP = ("prefix_tuning", "prefix_tuning_noproj", "p_tuning_v2")
# bf16 dense tensor-core peak, TFLOP/s (vendor datasheets, without sparsity)
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build_base(name: str, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    family, shape = MODELS[name]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        if family == "gpt2":
            base = GPT2LMHeadModel._from_config(GPT2Config(**shape), dtype=dtype, attn_implementation="sdpa")
        else:
            base = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=dtype, attn_implementation="sdpa")
    base.requires_grad_(False)
    return base.train()  # dropout as in training (GPT-2's 0.1; Llama has none)


def our_config(method: str, hidden: int):
    import softprompt as sp

    template = f"[P:{P}] {{text}} [MASK]"
    return {
        "prompt_tuning": lambda: sp.PromptTuningConfig(template=template),
        # PEFT's defaults: an MLP of width D; a bi-LSTM of D per direction, then an MLP of 2D
        "p_tuning_mlp": lambda: sp.PTuningConfig(template=template, encoder="mlp"),
        "p_tuning_lstm": lambda: sp.PTuningConfig(template=template, encoder="lstm", encoder_hidden_size=2 * hidden),
        "prefix_tuning": lambda: sp.PrefixTuningConfig(num_virtual_tokens=P, template="{text} [MASK]",
                                                       projection=True, projection_hidden_size=512),
        "prefix_tuning_noproj": lambda: sp.PrefixTuningConfig(num_virtual_tokens=P, template="{text} [MASK]",
                                                              projection=False),
        "p_tuning_v2": lambda: sp.PTuningV2Config(num_virtual_tokens=P, template="{text} [MASK]"),
    }[method]()


def peft_config(method: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=P)
    return {
        "prompt_tuning": lambda: PromptTuningConfig(**common),
        "p_tuning_mlp": lambda: PromptEncoderConfig(**common, encoder_reparameterization_type="MLP"),
        "p_tuning_lstm": lambda: PromptEncoderConfig(**common, encoder_reparameterization_type="LSTM"),
        "prefix_tuning": lambda: PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=512),
        "prefix_tuning_noproj": lambda: PrefixTuningConfig(**common, prefix_projection=False),
        # P-tuning v2 is prefix tuning without reparameterisation: PEFT's prefix tuning
        "p_tuning_v2": lambda: PrefixTuningConfig(**common, prefix_projection=False),
    }[method]()


# -- batches ----------------------------------------------------------------------------
def text_ids(B: int, S: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(B * 100_003 + S)
    return torch.randint(1000, min(vocab, 50000), (B, S), generator=g).to(device)


def our_batch(ids: torch.Tensor, deep: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """What `SoftPromptModel.encode` gives for ``[P:20] {text} [MASK]`` (input methods) or
    ``{text} [MASK]`` (deep): a causal LM's template is cut at [MASK], so the answer slot
    is the last column."""
    B, S = ids.shape
    if deep:
        input_ids, prompt_index = ids, torch.full_like(ids, -1)
    else:
        input_ids = torch.cat([torch.full((B, P), pad_id, dtype=ids.dtype, device=ids.device), ids], 1)
        prompt_index = torch.cat([torch.arange(P, device=ids.device).expand(B, P), torch.full_like(ids, -1)], 1)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), prompt_index=prompt_index,
                answer_index=torch.full((B,), input_ids.shape[1] - 1, device=ids.device))


# -- steps ------------------------------------------------------------------------------
def adamw(params) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.AdamW(params, lr=1e-3, fused=params[0].is_cuda or None)


def our_step(model, task, loss_kind: str, ids: torch.Tensor, tok, graphs: bool = False) -> Callable[[], None]:
    """softprompt's step as train.py runs it: fused AdamW told on the device to skip a
    non-finite step (found_inf), and each step's loss read one step late (its NaN check)."""
    batch = our_batch(ids, model.deep, tok.pad_token_id)
    labels = {"labels": torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)}
    optimizer = torch.optim.AdamW([p for p in list(model.prompt.parameters()) + list(task.parameters()) if p.requires_grad],
                                  lr=1e-3, fused=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pending: list[torch.Tensor] = []

    def loss() -> torch.Tensor:
        if loss_kind == "lm":  # the generation task's loss: labels are the real tokens
            return model(**batch, labels=ids).loss
        return task.loss(model, batch, labels)  # the verbalizer's loss at the answer slot

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        value = loss()
        value.backward()
        value = value.detach().float()
        optimizer.found_inf = (~torch.isfinite(value)).float()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pending and not torch.isfinite(pending.pop()).item():
            raise RuntimeError("non-finite loss")
        pending.append(value)

    return step


def peft_step(peft_model, loss_kind: str, ids: torch.Tensor, words: torch.Tensor, autocast: bool) -> Callable[[], None]:
    import torch.nn.functional as F

    mask = torch.ones_like(ids)
    labels = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    optimizer = adamw(p for p in peft_model.parameters() if p.requires_grad)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def loss() -> torch.Tensor:
        if loss_kind == "lm":
            return peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
        logits = peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]  # (B, V)
        return F.cross_entropy(logits.float().log_softmax(-1)[:, words], labels)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def floor_step(base, loss_kind: str, ids: torch.Tensor, words: torch.Tensor, graphs: bool = False) -> Callable[[], None]:
    """Forward + backward of the frozen model to its input embeddings over B x (S + P)."""
    import torch.nn.functional as F

    B, S = ids.shape
    full = torch.cat([ids[:, :P], ids], 1)  # S + P positions
    mask = torch.ones_like(full)
    labels = torch.zeros(B, dtype=torch.long, device=ids.device)
    embeds = base.get_input_embeddings()(full).detach()

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = embeds.clone().requires_grad_(True)
        if loss_kind == "lm":
            value = base(inputs_embeds=x, attention_mask=mask, labels=full, use_cache=False).loss
        else:
            logits = base(inputs_embeds=x, attention_mask=mask, logits_to_keep=1, use_cache=False).logits[:, -1]
            value = F.cross_entropy(logits.float().log_softmax(-1)[:, words], labels)
        value.backward()

    return step


REPEATS = 3


def measure(step: Callable[[], None], warmup: int, steps: int, repeats: int | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    reserved_before = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        reserved_before = torch.cuda.memory_reserved()
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    windows = []
    for _ in range(repeats or REPEATS):  # the median of a few windows: small models' steps vary with the host
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        windows.append((time.perf_counter() - start) / steps)
    seconds = sorted(windows)[len(windows) // 2]
    out = {"ms_per_step": round(seconds * 1e3, 3), "windows_ms": [round(w * 1e3, 3) for w in windows],
           "warmup_s": round(warm_s, 2)}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        # CUDA-graph replays use a private pool whose blocks do not count as allocations:
        # the reserved peak (minus what was reserved before) bounds what the graphs hold.
        out["peak_reserved_gib"] = round((torch.cuda.max_memory_reserved() - reserved_before) / 2**30, 3)
    return out


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - one failing row is reported, the rest still run
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the grid ---------------------------------------------------------------------------
def run_model(name: str, args, tok, report: dict, out: Path) -> None:
    import softprompt as sp
    from softprompt.training import regions
    from softprompt.tasks import Verbalizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build_base(name, device)
    N = sum(p.numel() for p in base.parameters())
    hidden = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.n_embd
    words = torch.tensor([tok.encode(" great")[0], tok.encode(" terrible")[0]], device=device)
    views = {"eager": base}
    if "compile" in args.variants:
        views["compile"] = regions.view(base, compile=True)
    if "graphs" in args.variants:
        views["graphs"] = regions.view(base, compile=True, compile_options={"mode": "reduce-overhead"})
    torch._dynamo.config.recompile_limit = 8 * regions.recompile_limit(base)  # every variant in one process
    peak = peak_tflops(torch.cuda.get_device_name(0)) if device == "cuda" else None

    def record(row: dict[str, Any]) -> None:
        B, S = row["batch"], row["seq"]
        if "ms_per_step" in row:
            row["tokens_per_s"] = round(B * S / (row["ms_per_step"] / 1e3), 1)
            if peak:
                row["pct_peak_4N"] = round(100 * row["tokens_per_s"] * 4 * N / (peak * 1e12), 2)
        row.update(model=name, params=N)
        key = tuple(row.get(k) for k in KEY)
        report["rows"] = [r for r in report["rows"] if tuple(r.get(k) for k in KEY) != key] + [row]
        print({k: row.get(k) for k in ("model", "batch", "seq", "loss", "side", "method", "variant", "tokens_per_s",
                                       "peak_gib", "error")}, flush=True)
        write_json(report, out)

    for shape in args.shapes:
        B, S = (int(x) for x in shape.split("x"))
        ids = text_ids(B, S, tok.vocab_size, device)
        for loss_kind in args.losses:
            key = dict(batch=B, seq=S, loss=loss_kind)
            if "floor" in args.sides:
                for variant in [v for v in args.variants if v in views]:
                    step = lambda: floor_step(views[variant], loss_kind, ids, words, variant == "graphs")  # noqa: E731
                    record({**key, "side": "floor", "method": None, "variant": variant,
                            **guarded(lambda: measure(step(), args.warmup, args.steps))})
            for method in args.methods:
                if "ours" in args.sides:
                    for variant in args.variants:
                        def ours() -> dict[str, Any]:
                            model = sp.SoftPromptModel(base, our_config(method, hidden), tokenizer=tok)
                            task = Verbalizer({"positive": " great", "negative": " terrible"})
                            task.bind(model)
                            options = {"mode": "reduce-overhead"} if variant == "graphs" else None
                            with model.accelerated(compile=variant in ("compile", "graphs"), compile_options=options,
                                                   checkpointing=variant == "checkpointing"):
                                model.train()
                                result = measure(our_step(model, task, loss_kind, ids, tok, variant == "graphs"),
                                                 args.warmup, args.steps)
                            result["trainable"] = model.trainable_parameters()
                            return result
                        record({**key, "side": "ours", "method": method, "variant": variant, **guarded(ours)})
                if "peft" in args.sides:
                    for autocast in args.peft_autocast:
                        def theirs() -> dict[str, Any]:
                            from peft import get_peft_model

                            peft_model = get_peft_model(base, peft_config(method))
                            try:
                                peft_model.train()
                                result = measure(peft_step(peft_model, loss_kind, ids, words, autocast),
                                                 args.warmup, args.steps)
                                result["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
                                return result
                            finally:
                                base.requires_grad_(False)
                        record({**key, "side": "peft", "method": method, "variant": "eager", "autocast": autocast,
                                **guarded(theirs)})
                        if method in DEEP or "checkpointing" not in args.variants:
                            continue

                        def theirs_ckpt() -> dict[str, Any]:
                            from peft import get_peft_model

                            peft_model = get_peft_model(base, peft_config(method))
                            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                            try:
                                peft_model.train()
                                return measure(peft_step(peft_model, loss_kind, ids, words, autocast),
                                               args.warmup, args.steps)
                            finally:
                                base.gradient_checkpointing_disable()
                                base.requires_grad_(False)
                        record({**key, "side": "peft", "method": method, "variant": "checkpointing",
                                "autocast": autocast, **guarded(theirs_ckpt)})
    views.clear()  # the compiled views (and their CUDA-graph pools) go before the next model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-124m,llama-1b,llama-8b")
    parser.add_argument("--shapes", default="8x256,16x512", help="BxS, comma-separated")
    parser.add_argument("--losses", default="lm,cls")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sides", default="floor,ours,peft")
    parser.add_argument("--variants", default="eager,compile,graphs",
                        help="eager, compile (train.compile=true), graphs (train.compile=reduce-overhead), checkpointing")
    parser.add_argument("--peft-autocast", default="off,on")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed windows of --steps steps; the median is kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    args = parser.parse_args()
    for name in ("models", "shapes", "losses", "methods", "sides", "variants"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    args.peft_autocast = [x == "on" for x in args.peft_autocast.split(",") if x]
    global REPEATS
    REPEATS = args.repeats
    tok = tokenizer()
    report = {"benchmark": "train_throughput", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else "CPU", "versions": versions(), "virtual_tokens": P, "steps": args.steps, "warmup": args.warmup,
              "rows": []}
    if args.out.exists():  # earlier rows are kept; a row measured again replaces its earlier value
        import json

        report["rows"] = json.loads(args.out.read_text()).get("rows", [])
    for name in args.models:
        run_model(name, args, tok, report, args.out)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
