"""`softprompt serve`: from the command's options to a listening server.

The CLI (`cli.serve`) is only the options; here they are checked (tasks given, an API key
where the address is not loopback, `--ray`'s limits), the base, bank, engine and application
are built, what the first requests would wait for is compiled and captured (`warmup.py`),
and the HTTP server runs (`http.py`) -- or, with ``--ray``, the replicas on Ray Serve
(`ray.py`). With ``--tensor-parallel`` (under torchrun) every process builds the same engine
on its part of the base; rank 0 serves HTTP and the others mirror its engine, cached
leading segments included (`lockstep.py`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from ..errors import ConfigError


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def launch(*, model: str, prompts: str | None, prompt_pairs: list[str], host: str, port: int, device: str,
           dtype: str | None, admin: bool, api_key: str | None, truncate: bool, max_batch_rows: int,
           max_batch_tokens: int, compile_decode: bool | dict, max_queue: int, head_share: float, max_head_wait: float,
           max_on_device: int | None, max_in_memory: int | None, lazy: bool, max_body_bytes: int, max_inputs: int,
           max_new_tokens: int, stream_interval: int, timeout_header: float, timeout_body: float,
           timeout_send: float, timeout_keep_alive: float, timeout_graceful_shutdown: float, max_connections: int,
           log_limit: int, log_interval: float, base_name: str | None, on_ray: bool, replicas: int,
           max_tasks_per_replica: int, tensor_parallel: bool = False) -> None:
    """Serve the tasks until interrupted; every argument is the `softprompt serve` option of
    the same name (``docs/cli/serve.md``).

    Raises:
        ConfigError: options that cannot serve (no tasks, ``--admin`` without ``--prompts``,
            a non-loopback ``--admin`` without a key, ``--ray`` with single-process options,
            ``--tensor-parallel`` with ``--admin`` or ``--ray``, or outside a torchrun launch).
        MissingExtraError: the ``serve`` extra (or ``ray`` for ``--ray``) is not installed.
    """
    import ipaddress

    from ..extras import require_extra
    from .bank import named_prompt_folders

    require_extra("serve", "softprompt serve")  # before the model loads
    from ..architecture import ModelKind, base_identity, model_spec
    from ..base_models import load_base, resolve_device
    from . import Engine, PromptBank
    from .guard import check_api_key
    from .http import HTTPLimits

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
    if tensor_parallel:
        check_tensor_parallel(admin=admin, on_ray=on_ray)
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
    base, tokenizer = load_base(model, dtype=dtype, tensor_parallel=tensor_parallel)
    if tensor_parallel:  # each process's part is on the device transformers put it on
        target = base.get_input_embeddings().weight.device
        base_identity(base)  # by every process now: a task read later (on one process alone) then gathers nothing
    else:
        target = resolve_device(device)
        base.to(target)
    # under tensor parallelism a task's cached leading segment is a collective forward: not computed
    # when a bank reads the task (rank 0 reads at submission), but at a message of the lockstep
    # (`lockstep.py`, `prompt_cache.LockstepLeads`)
    levels = dict(max_on_device=max_on_device, max_in_memory=max_in_memory, cache_prompts=not tensor_parallel)
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
    channel = None
    if tensor_parallel:
        from .wire import Channel

        channel = Channel()  # every process, before any runs its engine
    warm = compile_decode or target.type == "cuda"  # the same on every process: its forwards are collective
    if channel is not None and channel.rank > 0:
        follow_rank_0(engine, channel, warm)
        return
    try:
        _serve(bank, engine, channel, warm, model=model, target=target, host=host, port=port, limits=limits,
               app_options=dict(
                   max_queue=max_queue, admin=admin, api_key=api_key, prompt_root=prompts if admin else None,
                   max_body_bytes=max_body_bytes, max_inputs=max_inputs, max_new_tokens=max_new_tokens,
                   shutdown_timeout=timeout_graceful_shutdown, stream_interval=stream_interval,
                   head_share=head_share, max_head_wait=max_head_wait))
    finally:
        if channel is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _serve(bank, engine, channel, warm: bool, *, model: str, target, host: str, port: int, limits,
           app_options: dict) -> None:
    """The single process, or rank 0 of a tensor-parallel launch (`channel`): warm up, serve
    HTTP until interrupted; rank 0 then tells the other processes to stop."""
    from . import create_app
    from .http import serve as serve_http
    from .logprobs import token_texts

    served = engine
    if channel is not None:
        from .lockstep import LockstepEngine

        served = LockstepEngine(engine, channel)
    try:
        _warm(engine, warm)
        application = create_app(bank, engine=served, **app_options)
        token_texts(bank.tokenizer)  # what logprobs list (the vocabulary decoded once: ~1 s at 128k), not in a request
        tasks = [n for n in bank.names() if n != bank.base_name]
        alone = f" and the base model as {bank.base_name!r}" if bank.base_name is not None else ""
        split = "" if channel is None else f", split over {channel.size} processes (rank 0: pid {os.getpid()})"
        _say(f"serving {len(tasks)} task(s) ({', '.join(tasks)}){alone} on {model} ({target}{split}) "
             f"at http://{host}:{port}")
        if channel is not None:  # uvicorn raises the signal that stopped it again once it has stopped: rank 0
            for sig in (signal.SIGINT, signal.SIGTERM):  # lives on to tell the others (`stop`), then exits 0
                signal.signal(sig, _stopped)
        serve_http(application, host=host, port=port, limits=limits)
    finally:
        if channel is not None:
            served.stop()


def _stopped(signum, frame) -> None:
    """Rank 0's SIGINT and SIGTERM once uvicorn has stopped on them: nothing more to do."""


def _warm(engine, warm: bool) -> None:
    """Compile and capture what the first requests would wait for (`warmup.warm_up`)."""
    from .warmup import warm_up

    if warm:  # compiles and captures the step here, not in a first request
        started = time.perf_counter()
        warmed = warm_up(engine)
        if warmed:
            _say(f"warmed up in {time.perf_counter() - started:.1f} s (compiled and captured what the first "
                 f"requests would wait for; ran {', '.join(warmed)})")


def follow_rank_0(engine, channel, warm: bool) -> None:
    """A process > 0 of a tensor-parallel launch: the same warm-up as rank 0 (its forwards are
    collective), then rank 0's engine calls mirrored (`lockstep.follow`) until rank 0 says stop
    (on its SIGTERM or SIGINT). SIGINT is ignored here: a terminal's ^C reaches every process,
    and rank 0 alone decides when the others stop (torchrun, hit by the ^C too, still ends
    the launch its own way: SIGTERM to every process)."""
    import torch.distributed as dist

    from .lockstep import follow

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _warm(engine, warm)
        follow(engine, channel)
    finally:
        dist.destroy_process_group()


def check_tensor_parallel(*, admin: bool, on_ray: bool) -> None:
    """Refuse what a tensor-parallel server cannot mirror on every process, and a launch that
    is not distributed, before the model loads."""
    if on_ray:
        raise ConfigError("--tensor-parallel with --ray: Ray Serve's replicas each load a whole base; a split base is "
                          "served by one torchrun launch")
    if admin:
        raise ConfigError("--tensor-parallel with --admin: a task added or removed would have to reach every process "
                          "of the launch at the same point of its work; restart the launch with the new --prompts")
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("--tensor-parallel splits the base over the processes of a distributed launch: start with "
                          "`torchrun --nproc_per_node N -m softprompt.cli serve --tensor-parallel ...`")


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
