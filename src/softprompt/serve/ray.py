"""Replicas of the server on Ray Serve, each request routed to a replica that holds its task
(``softprompt serve --ray --replicas N``; extra ``softprompt[ray]``).

    from softprompt.serve.ray import deployment
    from ray import serve
    serve.run(deployment("smollm2-135m", "s3://bucket/prompts", replicas=4), route_prefix="/")

Two deployments (Ray Serve's own HTTP proxy in front):

  Router    the ingress: reads the request's task from its body (``model`` on the OpenAI
            routes, ``task`` on classify / tag; none on /v1/models, /health, /metrics) and
            hands the whole request to a replica with that task as Ray Serve's multiplexed
            model id, so that requests of a task go to a replica that has read it
            (`serve.multiplexed`: a task is hot on a few replicas, not on all, and the fleet
            holds more tasks than one replica's memory).
  Replica   one engine and prompt bank each (`create_app`, the single-process server's own
            routes, errors and batching): its tasks registered lazily from the shared store
            (`--prompts`: a folder, or an fsspec URL every replica reads: `io.remote`), at
            most ``max_tasks_per_replica`` in host memory. The request runs through the
            app in-process (ASGI), and its answer streams back chunk by chunk (server-sent
            events included) through the deployment handle's stream.

What a replica answers is what the single-process server answers: same routes, same bodies,
same errors (an unknown task: 404 in OpenAI's format, from the replica's bank).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

from ..errors import ConfigError
from ..extras import require

#: the routes whose body names the task, and the field that does
TASK_FIELDS = {"/v1/completions": "model", "/v1/chat/completions": "model", "/v1/classify": "task",
               "/v1/tag": "task"}
REPLICA_HEADER = "x-softprompt-replica"  # which replica answered (its process id): routing is observable
READS_HEADER = "x-softprompt-reads"  # prompt folders that replica has read so far (`PromptBank.reads`)


def task_of(path: str, body: bytes) -> str:
    """The task a request is for ('' when it names none, or its body is not JSON)."""
    field = TASK_FIELDS.get(path.rstrip("/"))
    if field is None:
        return ""
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    return value if isinstance(value, str) else ""


class Replica:
    """One server: a base model, its prompt bank (lazy, from the shared store), an engine
    and the app, run in-process for each request that the router hands over."""

    def __init__(self, model: str, prompts: str, *, base_name: str | None, dtype: str | None, device: str,
                 max_tasks: int, engine_options: dict[str, Any], app_options: dict[str, Any]):
        from ..architecture import ModelKind, model_spec
        from ..base_models import load_base, resolve_device
        from .app import create_app
        from .bank import PromptBank
        from .engine import Engine

        base, tokenizer = load_base(model, dtype=dtype)
        base.to(resolve_device(device))
        self.bank = PromptBank.from_directory(base, tokenizer, prompts, lazy=True, max_in_memory=max_tasks)
        if base_name is not None and model_spec(base).kind is not ModelKind.ENCODER:
            self.bank.add_base(base_name)
        self.app = create_app(self.bank, engine=Engine(self.bank, **engine_options), **app_options)
        self.pid = str(os.getpid())

    async def hold(self, task: str) -> str:
        """Read a task into this replica (the multiplexed loader: `deployment` wraps it in
        `serve.multiplexed`). An unknown task is left for the app to refuse, in its format."""
        if task in self.bank:
            await asyncio.to_thread(self.bank.__getitem__, task)
        return task

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> AsyncIterator[Any]:
        """The app's answer to one HTTP request: first ``{"status", "headers"}``, then the
        body's chunks as the app sends them."""
        from ray import serve

        task = serve.get_multiplexed_model_id()
        if task:
            await self.hold(task)
        queue: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "root_path": "",
                 "state": {}}
        run = asyncio.create_task(self.app(scope, receive, queue.put))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    run.result()  # the app ended without a complete answer: its error
                    return
                message = getter.result()
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": [(k.decode(), v.decode())
                                                                    for k, v in message.get("headers", [])]
                           + [(REPLICA_HEADER, self.pid), (READS_HEADER, str(self.bank.reads))]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        return
        finally:
            gone.set()  # a client gone (the stream closed early): the app sees its disconnect
            await asyncio.gather(run, return_exceptions=True)


class Router:
    """The ingress: each HTTP request handed to a replica, with its task as the
    multiplexed model id, and the replica's answer streamed back."""

    def __init__(self, replicas, affinity: bool = True):
        self.replicas = replicas
        self.affinity = affinity

    async def __call__(self, request):
        from starlette.responses import StreamingResponse

        body = await request.body()
        task = task_of(request.url.path, body)
        handle = self.replicas.options(stream=True, multiplexed_model_id=task if self.affinity else "")
        answer = handle.handle.remote(request.method, request.url.path, request.url.query.encode(),
                                      list(request.headers.raw), body)
        start = await answer.__anext__()
        headers = {k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")}

        async def chunks():
            async for chunk in answer:
                yield chunk

        return StreamingResponse(chunks(), status_code=start["status"], headers=headers,
                                 media_type=headers.get("content-type"))


def deployment(model: str, prompts: str | Path, *, replicas: int | None = 2, max_tasks_per_replica: int = 64,
               base_name: str | None = None, dtype: str | None = None, device: str = "auto",
               autoscaling_config: dict | None = None, ray_actor_options: dict | None = None,
               engine_options: dict | None = None, app_options: dict | None = None, affinity: bool = True):
    """A Ray Serve application of `replicas` servers of `model` behind a task-routing ingress.

    Args:
        model: the base model (an alias, a folder, a Hub id), loaded by every replica.
        prompts: the shared prompt store: a folder every replica can read, or an fsspec URL
            (``s3://bucket/prompts``), one sub-folder per task; each replica reads a task on
            its first request there.
        replicas: replicas of the server (None with `autoscaling_config`).
        max_tasks_per_replica: tasks a replica keeps read (host memory) and reports as held
            to the router (`serve.multiplexed`); the least recently used go first.
        base_name: the name the base model alone answers to (None: not served alone).
        autoscaling_config / ray_actor_options: Ray Serve's own, for the replicas (e.g.
            ``{"num_gpus": 1}``).
        engine_options / app_options: `Engine` / `create_app` keyword arguments.
        affinity: route a task's requests to the replicas holding it (False: wherever Ray
            Serve's load balancing sends them; for comparison, `bench.serve.ray_routing`).

    Returns:
        The application to pass to ``serve.run``.

    Raises:
        ConfigError: no replicas and no autoscaling, or a non-positive task cap.
        MissingExtraError: Ray is not installed (names the extra).
    """
    if autoscaling_config is None and (not isinstance(replicas, int) or replicas < 1):
        raise ConfigError(f"replicas must be a positive integer (or give autoscaling_config), got {replicas!r}")
    if not isinstance(max_tasks_per_replica, int) or max_tasks_per_replica < 1:
        raise ConfigError(f"max_tasks_per_replica must be a positive integer, got {max_tasks_per_replica!r}")
    require("ray", "ray", "softprompt serve --ray")
    from ray import serve

    class MultiplexedReplica(Replica):
        @serve.multiplexed(max_num_models_per_replica=max_tasks_per_replica)
        async def hold(self, task: str) -> str:
            return await Replica.hold(self, task)

    options: dict[str, Any] = {"ray_actor_options": ray_actor_options or {"num_cpus": 0}}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    replica = serve.deployment(MultiplexedReplica, name="SoftPromptReplica", **options)
    router = serve.deployment(Router, name="SoftPromptRouter", ray_actor_options={"num_cpus": 0})
    return router.bind(replica.bind(model, str(prompts), base_name=base_name, dtype=dtype, device=device,
                                    max_tasks=max_tasks_per_replica, engine_options=engine_options or {},
                                    app_options=app_options or {}), affinity=affinity)


__all__ = ["READS_HEADER", "REPLICA_HEADER", "Replica", "Router", "deployment", "task_of"]
