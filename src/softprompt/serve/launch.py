"""`softprompt serve`: from the command's options to a listening server.

The CLI (`cli.serve`) is only the options; here they are checked (tasks given, an API key
where the address is not loopback, `--ray`'s limits), the base, bank, engine and application
are built, what the first requests would wait for is compiled and captured (`warmup.py`),
and the HTTP server runs (`http.py`) -- or, with ``--ray``, the replicas on Ray Serve
(`ray.py`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import ConfigError


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def launch(*, model: str, prompts: str | None, prompt_pairs: list[str], host: str, port: int, device: str,
           dtype: str | None, admin: bool, api_key: str | None, truncate: bool, max_batch_rows: int,
           max_batch_tokens: int, compile_decode: bool, max_queue: int, head_share: float, max_head_wait: float,
           max_on_device: int | None, max_in_memory: int | None, lazy: bool, max_body_bytes: int, max_inputs: int,
           max_new_tokens: int, stream_interval: int, timeout_header: float, timeout_body: float,
           timeout_send: float, timeout_keep_alive: float, timeout_graceful_shutdown: float, max_connections: int,
           log_limit: int, log_interval: float, base_name: str | None, on_ray: bool, replicas: int,
           max_tasks_per_replica: int) -> None:
    """Serve the tasks until interrupted; every argument is the `softprompt serve` option of
    the same name (``docs/cli/serve.md``).

    Raises:
        ConfigError: options that cannot serve (no tasks, ``--admin`` without ``--prompts``,
            a non-loopback ``--admin`` without a key, ``--ray`` with single-process options).
        MissingExtraError: the ``serve`` extra (or ``ray`` for ``--ray``) is not installed.
    """
    import ipaddress

    from ..extras import require_extra
    from .bank import named_prompt_folders
    from .logprobs import token_texts
    from .warmup import warm_up

    require_extra("serve", "softprompt serve")  # before the model loads
    from ..architecture import ModelKind, model_spec
    from ..base_models import load_base, resolve_device
    from . import Engine, PromptBank, create_app
    from .guard import check_api_key
    from .http import HTTPLimits, serve as serve_http

    limits = HTTPLimits(timeout_header=timeout_header, timeout_body=timeout_body, timeout_send=timeout_send,
                        timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=timeout_graceful_shutdown,
                        max_connections=max_connections, log_limit=log_limit, log_interval=log_interval)
    limits.fit_open_files()  # before the model loads: a cap the process cannot hold fails at once
    from ..io.remote import is_url

    prompts = prompts if prompts is None or is_url(prompts) else Path(prompts)  # type: ignore[assignment]
    if on_ray:
        if prompts is None or prompt_pairs or lazy or max_in_memory is not None:
            raise ConfigError("--ray serves the tasks under --prompts (a folder or URL every replica reads, each task "
                              "read on its first request, at most --max-tasks-per-replica per replica); --prompt, "
                              "--lazy and --max-in-memory are for the single-process server")
    named = named_prompt_folders(prompt_pairs, prompts)
    if prompts is None and not named:
        raise ConfigError("give the tasks to serve: --prompts DIR (one sub-folder per task) and/or --prompt NAME=PATH")
    if admin and prompts is None:
        raise ConfigError("--admin needs --prompts DIR: the admin API loads prompt folders from under it only")
    if api_key is not None:
        check_api_key(api_key)

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and api_key is None:
        if admin:  # anyone who can reach the port could load any folder the server can read
            raise ConfigError(f"--admin on the non-loopback address {host} needs --api-key (or SOFTPROMPT_API_KEY)")
        _say(f"warning: serving on {host} without an API key: anyone who can reach the port can use it")
    if on_ray:  # after the key and address checks, which hold for the replicas' proxy too
        serve_on_ray(model, prompts, host=host, port=port, replicas=replicas, max_tasks=max_tasks_per_replica,
                     base_name=base_name_of(model, base_name), dtype=dtype, device=device,
                     engine_options=dict(max_batch_rows=max_batch_rows, max_batch_tokens=max_batch_tokens,
                                         truncate=truncate, compile=compile_decode),
                     app_options=dict(max_queue=max_queue, api_key=api_key, max_body_bytes=max_body_bytes,
                                      max_inputs=max_inputs, max_new_tokens=max_new_tokens, admin=admin,
                                      stream_interval=stream_interval, head_share=head_share,
                                      max_head_wait=max_head_wait))
        return
    served_as = base_name_of(model, base_name)
    target = resolve_device(device)
    base, tokenizer = load_base(model, dtype=dtype)
    base.to(target)
    levels = dict(max_on_device=max_on_device, max_in_memory=max_in_memory)
    if prompts is not None:
        bank = PromptBank.from_directory(base, tokenizer, prompts, lazy=lazy, **levels)
    else:
        bank = PromptBank(base, tokenizer, **levels)
    for name, path in named.items():
        bank.add(name, path)
    if base_name is not None or model_spec(base).kind is not ModelKind.ENCODER:  # an encoder alone generates nothing
        bank.add_base(served_as)  # a task of that name is refused here, by name
    engine = Engine(bank, max_batch_rows=max_batch_rows, max_batch_tokens=max_batch_tokens, truncate=truncate,
                    compile=compile_decode)
    application = create_app(bank, engine=engine, max_queue=max_queue, admin=admin, api_key=api_key,
                             prompt_root=prompts if admin else None, max_body_bytes=max_body_bytes,
                             max_inputs=max_inputs, max_new_tokens=max_new_tokens,
                             shutdown_timeout=timeout_graceful_shutdown, stream_interval=stream_interval,
                             head_share=head_share, max_head_wait=max_head_wait)
    if compile_decode or target.type == "cuda":  # compiles and captures the step here, not in a first request
        started = time.perf_counter()
        warmed = warm_up(engine)
        if warmed:
            _say(f"warmed up in {time.perf_counter() - started:.1f} s (compiled and captured what the first "
                 f"requests would wait for; ran {', '.join(warmed)})")
    token_texts(bank.tokenizer)  # what logprobs list (the vocabulary decoded once: ~1 s at 128k), not in a request
    tasks = [n for n in bank.names() if n != bank.base_name]
    alone = f" and the base model as {bank.base_name!r}" if bank.base_name is not None else ""
    _say(f"serving {len(tasks)} task(s) ({', '.join(tasks)}){alone} on {model} ({target}) at http://{host}:{port}")
    serve_http(application, host=host, port=port, limits=limits)


def serve_on_ray(model: str, prompts, *, host: str, port: int, replicas: int, max_tasks: int, base_name: str,
                  dtype: str | None, device: str, engine_options: dict, app_options: dict) -> None:
    """`serve --ray`: the application of `serve.ray.deployment` on Ray Serve's HTTP proxy at
    host:port, until interrupted."""
    from ..extras import require

    ray = require("ray", "ray", "softprompt serve --ray")
    from ray import serve as ray_serve

    from .ray import deployment

    application = deployment(model, prompts, replicas=replicas, max_tasks_per_replica=max_tasks,
                             base_name=base_name, dtype=dtype, device=device, engine_options=engine_options,
                             app_options=app_options)
    import signal

    def stop(signum, frame):  # SIGTERM as ^C: the cluster this started goes with the process
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ray.init(include_dashboard=False)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        ray_serve.run(application, name="softprompt", route_prefix="/")
        _say(f"serving {prompts} on {model} with {replicas} replica(s) on Ray Serve at http://{host}:{port}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def base_name_of(model: str, given: str | None) -> str:
    """The name the base model is served under: `given` (--base-name), else the --model
    argument as the user gave it (an alias such as ``smollm2-135m-instruct``), a local
    folder's name, or a hub id's last part (names are URL parts: no ``/``)."""
    from .entry import check_task_name

    if given is not None:
        return check_task_name(given)
    path = Path(model).expanduser()
    name = path.resolve().name if path.exists() else model.rstrip("/").rsplit("/", 1)[-1]
    try:
        return check_task_name(name)
    except ConfigError as e:
        raise ConfigError(f"--model {model!r} gives the base model the name {name!r}, which it cannot be served "
                          f"under ({e}): name it with --base-name") from None


__all__ = ["launch", "serve_on_ray", "base_name_of"]
