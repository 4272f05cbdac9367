"""The ``softprompt`` command line.

A thin layer over the library: every command parses its options, calls one library
function and prints the result. Library errors (`SoftPromptError`) are the user's to fix,
so they print as one ``error: ...`` line on stderr with exit status 1, never a traceback.

Each command imports the library modules it calls inside its body, not here: `softprompt
--help` (and any one command) then loads only what it needs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import typer

from .errors import ConfigError, SoftPromptError

app = typer.Typer(
    name="softprompt",
    help="Soft-prompt tuning on frozen transformers: train, evaluate, predict, inspect, serve.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback is only shown for real bugs; keep it plain (rich's boxes hide the frames in CI logs).
    pretty_exceptions_enable=False,
)


def _reports_errors(command: Callable) -> Callable:
    """Turn a `SoftPromptError` into ``error: <message>`` on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SoftPromptError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None

    return wrapper


# -- info ---------------------------------------------------------------------------------
def _format_info(info: dict[str, Any]) -> str:
    base = info["base_model"]
    trainable = (
        f"yes ({info['trainable_parameters']:,} parameters)" if info["trainable_state"] else "no (collapsed tensor only)"
    )
    rows = [
        ("path", info["path"]),
        ("method", info["method"]),
        ("kind", info["kind"]),
        ("template", info["template"]),
        ("num_virtual_tokens", info["num_virtual_tokens"]),
        ("tensor shape", "[" + ", ".join(str(d) for d in info["tensor_shape"]) + "]"),
        *([("input delta shape", "[" + ", ".join(str(d) for d in info["input_delta_shape"]) + "]")]
          if "input_delta_shape" in info else []),
        ("parameters", f"{info['parameters']:,}"),
        ("trainable state", trainable),
        ("size on disk", f"{info['size_bytes']} bytes"),
        ("base model", f"{base['model_type']} ({base['name_or_path'] or 'unnamed'})"),
        ("  architecture", base["architecture"]),
        ("  layers", base["num_layers"]),
        ("  hidden size", base["hidden_size"]),
    ]
    rows += [(f"metadata.{k}", json.dumps(v)) for k, v in info["metadata"].items()]
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in rows)


@app.command()
@_reports_errors
def info(
    directory: str = typer.Argument(..., help="A prompt directory written by save_pretrained, or a Hub id user/repo[@revision][:subdir]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Describe a saved prompt: method, template, base model, tensor shape, size on disk."""
    from .folder import prompt_info
    from .io.hub import resolve_prompt_source

    result = prompt_info(resolve_prompt_source(directory))
    typer.echo(json.dumps(result) if as_json else _format_info(result))


# -- train / eval / predict ---------------------------------------------------------------
@app.command()
@_reports_errors
def train(
    model: str = typer.Option(None, "--model", help="Required (or from --config): alias (minilm, smollm2-135m, bert-tiny-mlm), local path or hub id."),
    method: str = typer.Option(None, "--method", help="prompt-tuning | p-tuning | prefix-tuning | p-tuning-v2 | dept [default: p-tuning-v2]."),
    task: str = typer.Option(None, "--task", help="Required (or from --config): a recipe (sst2, rte, fewglue-cb, wnut17, lama-trex, ...) or classification | ner | generation."),
    output: Path = typer.Option(None, "--output", "-o", help="The run directory."),
    train_file: str = typer.Option(None, "--train", help="Training data file (jsonl, json, csv, tsv, conll, hf:NAME)."),
    eval_file: str = typer.Option(None, "--eval", help="Dev data file, for evaluation and model selection."),
    test_file: str = typer.Option(None, "--test", help="Test data file: the best prompt (on --eval) is scored on it at the end."),
    template: str = typer.Option(None, "--template", help='Template, e.g. "[P:3] {text} [P:3] It was [MASK] ."'),
    labels: list[str] = typer.Option(None, "--labels", help="Labels, or LABEL:WORD[|WORD] for a verbalizer; repeatable."),
    fields: list[str] = typer.Option(None, "--field", help="Map a data column to a template field: COLUMN:FIELD; repeatable."),
    num_virtual_tokens: int = typer.Option(None, "--num-virtual-tokens", "-P", help="Virtual tokens (deep methods: per layer) [default: 20 for deep methods, else the template's slots]."),
    data_root: str = typer.Option(None, "--data-root", envvar="SOFTPROMPT_DATA", help="Where recipes find their data."),
    config: Path = typer.Option(None, "--config", help="A YAML run file; the options above and --set override it."),
    sets: list[str] = typer.Option(None, "--set", help="Override any setting: KEY=VALUE (train.lr=0.01, prompt.encoder=mlp, ...); repeatable. --print-config shows every key with its value."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --output."),
    print_config: bool = typer.Option(False, "--print-config",
                                      help="Print the whole configuration as a YAML run file (--config reads it) and exit."),
) -> None:
    """Train a soft prompt; prints the final metrics as JSON on stdout."""
    from .folder import RUN_PROMPT
    from .training.config import RunConfig, apply_sets, load_yaml, to_yaml
    from .training.run import run_training

    cfg = RunConfig()
    from_config = load_yaml(config, cfg) if config is not None else []
    given = {"model": model, "method": method, "task": task, "output": str(output) if output else None,
             "train_file": train_file, "eval_file": eval_file, "test_file": test_file, "template": template, "labels": labels or None,
             "fields": fields or None, "num_virtual_tokens": num_virtual_tokens, "data_root": data_root}
    for key, value in given.items():
        if value is not None:
            setattr(cfg, key, value)
    apply_sets(cfg, sets or [])
    set_keys = [item.partition("=")[0].strip() for item in sets or []]
    for name, value in (("model", model), ("task", task)):
        if value is None and name not in from_config and name not in set_keys and not resume:
            # a default would train the SST-2 demo on MiniLM when a user only forgot the option
            raise typer.BadParameter(f"--{name} is required (or a --config that sets it)", param_hint=f"--{name}")
    if print_config:
        cfg.validate()
        typer.echo(to_yaml(cfg), nl=False)
        return
    if output is None and config is None and not resume:
        raise typer.BadParameter("--output is required", param_hint="--output")
    result = run_training(cfg, resume=resume, overwrite=overwrite)
    best = result.metrics.get("best") or {}
    metric = result.metrics.get("metric")
    if metric in best:
        typer.echo(f"best dev {metric}: {best[metric]:.4f} at step {result.best_step} of {result.steps} "
                   f"({result.stopped}); prompt saved to {Path(cfg.output) / RUN_PROMPT}", err=True)
        if metric in result.metrics.get("test", {}):
            typer.echo(f"test {metric} of that prompt: {result.metrics['test'][metric]:.4f}", err=True)
    typer.echo(json.dumps(result.metrics))


@app.command("eval")
@_reports_errors
def eval_(
    prompt: str = typer.Option(None, "--prompt", help="A run directory or its prompt/ folder, or a Hub id user/repo[@revision][:subdir]."),
    task: str = typer.Option(None, "--task", help="Recipe to evaluate on (default: the one it was trained on)."),
    split: str = typer.Option("test", "--split", help="train | dev | test."),
    data: str = typer.Option(None, "--data", help="Evaluate on this file instead of a recipe split."),
    model: str = typer.Option(None, "--model", help="Base model (default: the one it was trained on)."),
    fields: list[str] = typer.Option(None, "--field", help="With --data: map a column to a template field, COLUMN:FIELD; repeatable."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="No trained prompt: the base model with the task's manual template (needs --model and --task)."),
    template: str = typer.Option(None, "--template", help="With --zero-shot: the manual template (default: the recipe's)."),
    labels: list[str] = typer.Option(None, "--labels", help="With --zero-shot and --data: LABEL:WORD[|WORD]; repeatable."),
    data_root: str = typer.Option(None, "--data-root", envvar="SOFTPROMPT_DATA", help="Where recipes find their data."),
    batch_size: int = typer.Option(64, "--batch-size"),
    harness: str = typer.Option(None, "--harness", help="lm-eval tasks, TASK[,TASK]: lm-evaluation-harness's registry run on the prompt (or, with --model and no --prompt, on the base alone); needs the eval extra."),
    limit: int = typer.Option(None, "--limit", help="With --harness: at most this many documents per task."),
    include_path: str = typer.Option(None, "--include-path", help="With --harness: a folder of lm-eval task YAML files beside its registry."),
) -> None:
    """Evaluate a trained prompt (or, with --zero-shot, the manual prompt alone; with --harness, on lm-eval's tasks); prints a metrics JSON object."""
    from .training.evaluate import evaluate_trained, evaluate_zero_shot

    if harness:
        from .harness import evaluate_folder

        tasks = [t.strip() for t in harness.split(",") if t.strip()]
        results = evaluate_folder(tasks, prompt=prompt, model=model, batch_size=batch_size, limit=limit,
                                  include_path=include_path)
        typer.echo(json.dumps(results, default=str))
        return
    if zero_shot:
        if prompt is not None:
            raise ConfigError("--zero-shot evaluates the base model without a trained prompt: drop --prompt")
        if not model or not (task or data):
            raise ConfigError("--zero-shot needs --model and --task (or --data with --labels)")
        result = evaluate_zero_shot(model, task or "classification", split=split, template=template,
                                    data_root=data_root, data_file=data, labels=labels or None,
                                    fields=fields or None, batch_size=batch_size)
    else:
        if prompt is None:
            raise ConfigError("give --prompt DIR (a trained prompt), or --zero-shot --model M --task T")
        result = evaluate_trained(prompt, split=split, task_name=task, data_root=data_root, data_file=data,
                                  model=model, batch_size=batch_size, fields=fields or None)
    typer.echo(json.dumps(result))


@app.command()
@_reports_errors
def predict(
    prompt: str = typer.Option(..., "--prompt", help="A run directory or its prompt/ folder, or a Hub id user/repo[@revision][:subdir]."),
    texts: list[str] = typer.Argument(None, help="Inputs for a template with one field."),
    input_file: Path = typer.Option(None, "--input", help="A data file of examples (jsonl, json, csv, tsv, conll, hf:NAME): the template's fields, or columns renamed by --field."),
    fields: list[str] = typer.Option(None, "--field", help="Map a column of --input to a template field: COLUMN:FIELD; repeatable."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the JSON lines to this file (atomically, with a progress bar) instead of stdout."),
    model: str = typer.Option(None, "--model", help="Base model (default: the one it was trained on)."),
    batch_size: int = typer.Option(32, "--batch-size"),
) -> None:
    """Predict with a trained prompt: one JSON line per input, on stdout or in --output."""
    from .folder import load_trained
    from .io.atomic import write_file_atomically
    from .training.evaluate import read_inputs

    sp_model, task, _ = load_trained(prompt, model=model)
    examples = read_inputs(sp_model, task, texts or [], input_file, fields or None)

    def lines():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch, _ = task.collate(sp_model, chunk, with_targets=False)
            for example, prediction in zip(chunk, task.predict(sp_model, batch)):
                yield json.dumps({"input": example, "prediction": prediction}) + "\n"

    if output is None:
        for line in lines():
            typer.echo(line, nl=False)
        return
    from tqdm.auto import tqdm

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f, tqdm(total=len(examples), desc="predict", unit="row") as bar:
            for line in lines():
                f.write(line)
                bar.update()

    write_file_atomically(output, write)  # a run stopped midway leaves no half-written file
    typer.echo(f"{len(examples)} predictions written to {output}", err=True)


# -- PEFT adapters in and out -------------------------------------------------------------
FORMATS = ("peft",)


def _check_format(value: str, option: str) -> None:
    if value not in FORMATS:
        raise ConfigError(f"{option} {value!r}: known formats: {', '.join(FORMATS)}")


@app.command("import")
@_reports_errors
def import_(
    source: Path = typer.Argument(..., help="The adapter folder (adapter_config.json, adapter_model.safetensors)."),
    output: Path = typer.Argument(..., help="The prompt folder to write."),
    from_format: str = typer.Option("peft", "--from", help="The adapter's format: peft."),
    model: str = typer.Option(..., "--model", help="The base model the adapter was trained on (alias, path or hub id)."),
) -> None:
    """Import a PEFT prompt-learning adapter (prompt tuning, P-tuning, prefix tuning) as a prompt folder."""
    from .base_models import load_base
    from .peft_format import import_peft

    _check_format(from_format, "--from")
    base, tokenizer = load_base(model)
    sp_model = import_peft(source, base, tokenizer)
    sp_model.save_pretrained(output, metadata={"model": model, "imported_from": f"peft:{source}"})
    typer.echo(f"imported {sp_model.config.method} ({sp_model.num_virtual_tokens} virtual tokens) to {output}")


@app.command("export")
@_reports_errors
def export(
    prompt: str = typer.Argument(..., help="A run directory or its prompt/ folder, or a Hub id user/repo[@revision][:subdir]."),
    output: Path = typer.Argument(..., help="The adapter folder to write."),
    to_format: str = typer.Option("peft", "--to", help="The adapter format: peft."),
    model: str = typer.Option(None, "--model", help="Base model (default: the one it was trained on)."),
    without_head: bool = typer.Option(False, "--without-head",
                                      help="Export the prompt alone when the folder also holds a trained task head."),
) -> None:
    """Export a prompt as a PEFT adapter folder (`PeftModel.from_pretrained` loads it)."""
    from .folder import load_recorded_base
    from .io.prompt import HEAD_FILE
    from .model import SoftPromptModel
    from .peft_format import export_peft

    _check_format(to_format, "--to")
    directory, saved, base, tokenizer = load_recorded_base(prompt, model=model, device="cpu")
    if (directory / HEAD_FILE).exists() and not without_head:
        # PEFT keeps a trained head in `modules_to_save` of a base that has that module
        # (`...ForSequenceClassification.classifier`); ours sits on the bare model
        raise ConfigError(f"{directory} holds a trained task head ({HEAD_FILE}): a PEFT prompt-learning adapter has "
                          "no place for it on this base, so the exported adapter would predict without it; "
                          "pass --without-head to export the prompt alone")
    export_peft(SoftPromptModel.from_pretrained(base, directory, tokenizer=tokenizer), output)
    typer.echo(f"exported {saved['method']} to {output} (PEFT format)")


# -- the Hugging Face Hub -----------------------------------------------------------------
@app.command()
@_reports_errors
def push(
    prompt: Path = typer.Argument(..., help="A prompt folder, or a run directory (its prompt/ folder is pushed)."),
    repo: str = typer.Argument(..., help="user/repo, optionally @branch and :subdir (several prompts in one repository)."),
    public: bool = typer.Option(False, "--public", help="Create the repository public (default: private)."),
    token: str = typer.Option(None, "--token", help="A Hub token with write access [default: HF_TOKEN or the stored login]."),
    message: str = typer.Option(None, "--message", "-m", help="The commit message."),
) -> None:
    """Upload a saved prompt to the Hugging Face Hub (one commit); load it back with --prompt user/repo."""
    from .folder import prompt_directory, prompt_info
    from .io.hub import push_prompt_folder

    if not prompt.is_dir():
        raise ConfigError(f"{prompt}: no such folder (push uploads a local prompt folder or run directory)")
    directory = prompt_directory(prompt)
    info = prompt_info(directory)  # refuses a folder that is not a readable prompt before anything is uploaded
    url = push_prompt_folder(directory, repo, private=not public, token=token, commit_message=message)
    typer.echo(f"pushed {info['method']} prompt {directory} to {repo}: {url}")


# -- models -------------------------------------------------------------------------------
@app.command()
@_reports_errors
def models(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """List the packaged offline models (aliases for load_base) and whether each is installed."""
    from .base_models import ALIASES, missing_packages

    rows = []
    for alias, description in ALIASES.items():
        missing = missing_packages(alias)
        rows.append({"alias": alias, "installed": not missing, "missing": missing, "description": description})
    if as_json:
        typer.echo(json.dumps({"models": rows}))
        return
    width = max(len(r["alias"]) for r in rows)
    for r in rows:
        status = "installed" if r["installed"] else "missing: " + ", ".join(r["missing"])
        typer.echo(f"{r['alias']:<{width}}  {status:<12}  {r['description']}")


@app.command()
@_reports_errors
def tokenizer(
    model: str = typer.Argument(..., help="The base model: alias, local path, .gguf file or hub id."),
    output: str = typer.Option(..., "--output", "-o", help="The folder to write (created; an existing one is refused)."),
) -> None:
    """Save a base model's tokenizer as a transformers folder: what a client that tokenizes on its side loads
    (lm-eval's tokenizer_backend=huggingface,tokenizer=FOLDER), the same as `softprompt serve --model MODEL` uses."""
    from .base_models import load_base

    target = Path(output)
    if target.exists():
        raise ConfigError(f"{target} exists already: give a new folder")
    _, tok = load_base(model)
    tok.save_pretrained(target)
    typer.echo(str(target))


# -- serve -----------------------------------------------------------------------------
@app.command()
@_reports_errors
def serve(
    model: str = typer.Option(..., "--model", help="The shared base model: alias, local path or hub id."),
    prompts: str = typer.Option(None, "--prompts", help="A folder with one sub-folder per task (prompt folders or run directories), local or at an fsspec URL (s3://bucket/prompts, gs://..., memory://...: copied into the cache as each task is read)."),
    prompt_pairs: list[str] = typer.Option(None, "--prompt", help="NAME=PATH: one task from its prompt folder or run directory, a Hub id user/repo[@revision][:subdir], or an fsspec URL (repeatable; beside or instead of --prompts)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8000, "--port"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default: the checkpoint's loader default)."),
    admin: bool = typer.Option(False, "--admin", help="Enable PUT / DELETE /v1/prompts/{task} and their vLLM-shaped aliases POST /v1/load_lora_adapter and /v1/unload_lora_adapter."),
    api_key: str = typer.Option(None, "--api-key", envvar="SOFTPROMPT_API_KEY", help="Require Authorization: Bearer KEY on every endpoint."),
    truncate: bool = typer.Option(False, "--truncate", help="Cut over-long inputs instead of answering 413."),
    max_batch_rows: int = typer.Option(64, "--max-batch-rows"),
    max_batch_tokens: int = typer.Option(16384, "--max-batch-tokens", help="Most padded tokens (rows x longest row) in one forward: a batch of head requests, or rows joining the running decode batch (the rest join after its next step)."),
    compile_decode: bool = typer.Option(False, "--compile", help="Compile the decode step (before its CUDA graph is captured), the prefill of joining rows and the head requests' forward with torch.compile (1B Llama shape on an H100: 2.0 instead of 3.2 ms a step at 64 rows). Compiled at start-up, before the server listens: each compiled version took 30-60 s for a 1B model on an H100, so minutes in all. Falls back to the uncompiled step, with one warning, where compiling fails."),
    compile_regional: bool = typer.Option(False, "--compile-regional", help="--compile, with the head requests' and joining rows' forwards and the decode step compiled block by block (regional compilation: one compile of a block serves every block) instead of whole: a 16-layer forward compiled cold in 3.0 instead of 44.9 s on a 2-core CPU (bench/results/compile_time_cpu.json); the whole 1B decode step took 129 s to compile and capture on an H100. Its speed and start-up on a GPU are not measured yet."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Waiting requests beyond this get 429."),
    head_share: float = typer.Option(0.5, "--head-share", min=0.0, max=1.0, help="While completions decode, the share of the engine's time that head requests (classify, tag, embeddings of a head) may take between decode steps; 1: they run between any two steps (completions then wait behind each head forward), 0: only once they waited --max-head-wait."),
    max_head_wait: float = typer.Option(0.1, "--max-head-wait", min=0.0, help="Seconds after which a waiting head request runs between two decode steps whatever --head-share."),
    max_on_device: int = typer.Option(None, "--max-on-device", help="Most tasks' prompts kept on the accelerator (LRU)."),
    max_in_memory: int = typer.Option(None, "--max-in-memory", help="Most tasks read from folders kept in host memory (LRU; the others are read again from their folder on their next request)."),
    lazy: bool = typer.Option(False, "--lazy", help="Register the folders under --prompts without reading them: each task is read on its first request (start-up in the time of listing thousands of tasks)."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="Larger request bodies get 413."),
    max_inputs: int = typer.Option(256, "--max-inputs", min=1, help="Most inputs (or prompts) in one request (413 beyond)."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Most tokens one completion may ask for (422 beyond)."),
    stream_interval: int = typer.Option(1, "--stream-interval", min=1, help="A stream's tokens per write after its first (1: each at once); more: fewer writes and wake-ups of the event loop per token, for more latency between pieces."),
    timeout_header: float = typer.Option(10.0, "--timeout-header", help="Seconds a client has to send a request's headers (then its connection is closed)."),
    timeout_body: float = typer.Option(30.0, "--timeout-body", help="Seconds a client has to send a request's body after its headers."),
    timeout_send: float = typer.Option(60.0, "--timeout-send", help="Seconds a response may wait for a client that stopped reading."),
    timeout_keep_alive: float = typer.Option(5.0, "--timeout-keep-alive", help="Seconds an idle keep-alive connection stays open."),
    timeout_graceful_shutdown: float = typer.Option(10.0, "--timeout-graceful-shutdown", help="On SIGTERM, seconds running requests may finish before they are cancelled."),
    max_connections: int = typer.Option(1024, "--max-connections", help="Most open connections (beyond: the longest idle one is closed, or 503)."),
    log_limit: int = typer.Option(10, "--log-limit", help="Most log records of one kind per --log-interval (then one line says the rest are dropped)."),
    log_interval: float = typer.Option(60.0, "--log-interval", help="Seconds of the log rate limit's window."),
    base_name: str = typer.Option(None, "--base-name", help="The name the base model alone (no prompt) answers to in completions and chat (default: --model as given, or its folder's / hub id's last part; encoder-only bases are not served alone)."),
    on_ray: bool = typer.Option(False, "--ray", help="Serve with Ray Serve: --replicas copies of the server behind Ray Serve's HTTP proxy, each request routed to a replica that holds its task (extra: ray; RAY_ADDRESS joins a running cluster, else a local one starts). Tasks come from --prompts, the store every replica reads lazily."),
    replicas: int = typer.Option(2, "--replicas", min=1, help="With --ray: replicas of the server."),
    max_tasks_per_replica: int = typer.Option(64, "--max-tasks-per-replica", min=1, help="With --ray: tasks a replica keeps read (the least recently used go first); the router sends a task's requests to the replicas that hold it."),
    tensor_parallel: bool = typer.Option(False, "--tensor-parallel", help="Split the base over the processes of a torchrun launch (torchrun --nproc_per_node N -m softprompt.cli serve --tensor-parallel ...; transformers' tp_plan, safetensors checkpoints): rank 0 serves HTTP, the others run its engine's work in lockstep. Not with --admin or --ray; stop it by signalling rank 0."),
) -> None:
    """Serve many tasks' prompts on one base model over HTTP (classify, tag, OpenAI-style completions),
    and the base model alone under its own name."""
    from .serve.launch import launch

    launch(model=model, prompts=prompts, prompt_pairs=prompt_pairs or [], host=host, port=port, device=device,
           dtype=dtype, admin=admin, api_key=api_key, truncate=truncate, max_batch_rows=max_batch_rows,
           max_batch_tokens=max_batch_tokens,
           compile_decode={"regional": True} if compile_regional else compile_decode, max_queue=max_queue,
           head_share=head_share, max_head_wait=max_head_wait, max_on_device=max_on_device,
           max_in_memory=max_in_memory, lazy=lazy, max_body_bytes=max_body_bytes, max_inputs=max_inputs,
           max_new_tokens=max_new_tokens, stream_interval=stream_interval, timeout_header=timeout_header,
           timeout_body=timeout_body, timeout_send=timeout_send, timeout_keep_alive=timeout_keep_alive,
           timeout_graceful_shutdown=timeout_graceful_shutdown, max_connections=max_connections,
           log_limit=log_limit, log_interval=log_interval, base_name=base_name, on_ray=on_ray, replicas=replicas,
           max_tasks_per_replica=max_tasks_per_replica, tensor_parallel=tensor_parallel)


# -- version and environment ------------------------------------------------------------
def _version_option(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"softprompt {version('softprompt')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_option, is_eager=True,
                                       help="Print softprompt's version and exit.")) -> None:
    pass  # the options every command shares (only --version, today)


@app.command()
def env() -> None:
    """Versions, device and installed extras (paste it into a bug report)."""
    from .extras import environment

    for key, value in environment().items():
        typer.echo(f"{key}: {value}")


def main() -> None:  # pragma: no cover - `python -m softprompt.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
