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

Admin (``app_options={"admin": True}``, ``serve --ray --admin``): a load or unload goes to
one replica like any request; once that replica has answered 200, the router writes the
change into the `PromptRegistry` (a named Ray actor: the ordered log of admin changes) and
sends the log's length with every later request. A replica behind that length applies the
missing changes to its bank before it answers (a load registers the folder, read on the
task's first request there; an unload removes it), and every replica also follows the log
every `FOLLOW_SECONDS` on its own. So a change reaches every replica, a replica started
later (autoscaling, or the replacement of one that died) replays the whole log, and a
request sent after the admin's 200 sees the change whichever replica answers it.

A replica that dies mid-request: the requests in flight on it that had sent nothing yet
are sent once more, to another replica (`Router.forward`); one that fails again, or a
stream already under way, ends in a 503 / a cut stream. Ray Serve starts a replacement.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from ..errors import ConfigError
from ..extras import require

log = logging.getLogger("softprompt.serve.ray")

#: the routes whose body names the task, and the field that does
TASK_FIELDS = {"/v1/completions": "model", "/v1/chat/completions": "model", "/v1/classify": "task",
               "/v1/tag": "task"}
#: the admin routes, and how each names the task and folder it changes
ADMIN_ROUTES = {("PUT", "/v1/prompts"): ("load", None, "path"), ("DELETE", "/v1/prompts"): ("unload", None, None),
                ("POST", "/v1/load_lora_adapter"): ("load", "lora_name", "lora_path"),
                ("POST", "/v1/unload_lora_adapter"): ("unload", "lora_name", None)}
FOLLOW_SECONDS = 2.0  # how often an idle replica reads the admin's log
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


def admin_change(method: str, path: str, body: bytes) -> tuple[str, str, str | None] | None:
    """(``load`` / ``unload``, task, folder) of an admin request (None: not one, or a body
    that names no task: the replica refuses it, and nothing is logged)."""
    route = path.rstrip("/")
    head, _, name = route.rpartition("/")
    key = (method, head) if head == "/v1/prompts" else (method, route)
    if key not in ADMIN_ROUTES:
        return None
    op, task_field, path_field = ADMIN_ROUTES[key]
    try:
        fields = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(fields, dict):
        return None
    task = name if task_field is None else fields.get(task_field)
    folder = fields.get(path_field) if path_field else None
    if not isinstance(task, str) or (path_field and not isinstance(folder, str)):
        return None
    return op, task, folder


class PromptRegistry:
    """The admin's changes to the served tasks, in order (a Ray actor, named per
    application: `registry`). Entry i is change i+1: ``{"op", "task", "path", "origin"}``,
    ``origin`` the replica that made it (which skips it when it follows the log)."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []

    def record(self, op: str, task: str, path: str | None, origin: str) -> int:
        """Log a change; the log's length after it."""
        self.changes.append({"op": op, "task": task, "path": path, "origin": origin})
        return len(self.changes)

    def since(self, version: int) -> list[dict[str, Any]]:
        """The changes after the first `version`."""
        return self.changes[version:]

    def version(self) -> int:
        return len(self.changes)


def registry(name: str):
    """The application's `PromptRegistry` actor, started by whoever asks first (router or
    replica). Detached, so that it outlives any one replica (its owner otherwise); it goes
    with the cluster."""
    import ray

    actor = ray.remote(num_cpus=0)(PromptRegistry)
    return actor.options(name=name, namespace="softprompt", get_if_exists=True, lifetime="detached").remote()


class Replica:
    """One server: a base model, its prompt bank (lazy, from the shared store), an engine
    and the app, run in-process for each request that the router hands over."""

    def __init__(self, model: str, prompts: str, *, base_name: str | None, dtype: str | None, device: str,
                 max_tasks: int, engine_options: dict[str, Any], app_options: dict[str, Any],
                 registry_name: str | None = None):
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
        self.registry = registry(registry_name) if registry_name else None
        self.version = 0  # admin changes applied (the registry's log up to here)
        self._following: asyncio.Lock | None = None
        self._follower: asyncio.Task | None = None

    async def follow(self, version: int | None = None) -> None:
        """Apply the admin's changes up to `version` (None: the log's end) to this bank."""
        if self.registry is None or (version is not None and version <= self.version):
            return
        if self._following is None:
            self._following = asyncio.Lock()
        async with self._following:
            if version is not None and version <= self.version:
                return
            for change in await self.registry.since.remote(self.version):
                if change["origin"] != self.pid:
                    await asyncio.to_thread(self._apply, change)
                self.version += 1

    def _apply(self, change: dict[str, Any]) -> None:
        """One change: a load registers the folder (read on the task's first request), an
        unload removes the task. A folder this replica cannot read is logged, not raised:
        the task then answers what its folder's error says, here only."""
        from ..errors import SoftPromptError

        try:
            if change["op"] == "load":
                self.bank.register(change["task"], change["path"], replace=True)
            elif change["task"] in self.bank:
                self.bank.remove(change["task"])
        except SoftPromptError as e:
            log.warning("admin change %s of task %r not applied on this replica: %s", change["op"], change["task"], e)

    async def _follow_forever(self) -> None:
        """Follow the log on a timer, for changes made through another router."""
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            try:
                await self.follow()
            except Exception as e:  # the registry unreachable for a while: the next round tries again
                log.warning("reading the admin's log failed: %s", e)

    async def hold(self, task: str) -> str:
        """Read a task into this replica (the multiplexed loader: `deployment` wraps it in
        `serve.multiplexed`). An unknown task is left for the app to refuse, in its format."""
        if task in self.bank:
            await asyncio.to_thread(self.bank.__getitem__, task)
        return task

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes, version: int = 0) -> AsyncIterator[Any]:
        """The app's answer to one HTTP request, after the admin's changes up to `version`:
        first ``{"status", "headers"}``, then the body's chunks as the app sends them."""
        from ray import serve

        if self.registry is not None and self._follower is None:
            self._follower = asyncio.create_task(self._follow_forever())
        await self.follow(version)
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
    multiplexed model id and the admin log's length, and the replica's answer streamed
    back; an admin change a replica accepted is logged in the registry."""

    def __init__(self, replicas, affinity: bool = True, registry_name: str | None = None):
        self.replicas = replicas
        self.affinity = affinity
        self.registry = registry(registry_name) if registry_name else None
        self.version = 0  # the admin log's length as this router knows it

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes, task: str):
        """(the answer's start, the rest of its stream) from a replica. A replica that dies
        before it starts the answer: the request is sent once more (Ray Serve routes it to
        a live replica); a second failure raises."""
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            handle = self.replicas.options(stream=True, multiplexed_model_id=task if self.affinity else "")
            answer = handle.handle.remote(method, path, query, headers, body, self.version)
            try:
                return await answer.__anext__(), answer
            except RayActorError:
                if attempt == 2:
                    raise
                log.warning("a replica died before it answered %s %s: sent once more", method, path)

    async def __call__(self, request):
        from ray.exceptions import RayActorError
        from starlette.responses import JSONResponse, StreamingResponse

        from .errors import error_body

        body = await request.body()
        path = request.url.path
        root = request.scope.get("root_path", "")  # the application's route prefix: not the replica's routes
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        try:
            start, answer = await self.forward(request.method, path, request.url.query.encode(),
                                               list(request.headers.raw), body, task_of(path, body))
        except RayActorError as e:
            return JSONResponse(error_body(503, f"the replica serving this request failed twice ({type(e).__name__}); "
                                                "retry"), 503, headers={"retry-after": "1"})
        headers = {k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
        change = admin_change(request.method, path, body) if self.registry is not None else None
        if change is not None and start["status"] == 200:
            self.version = await self.registry.record.remote(*change, headers.get(REPLICA_HEADER, ""))

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
        engine_options / app_options: `Engine` / `create_app` keyword arguments; with
            ``admin=True`` the admin routes load and unload tasks on every replica (from
            under ``prompt_root``, by default `prompts`).
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

    app_options = dict(app_options or {})
    if app_options.get("admin"):
        app_options.setdefault("prompt_root", str(prompts))
    # admin changes reach every replica through the application's own log
    registry_name = f"softprompt-registry-{uuid.uuid4().hex[:12]}" if (app_options or {}).get("admin") else None
    options: dict[str, Any] = {"ray_actor_options": ray_actor_options or {"num_cpus": 0}}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    replica = serve.deployment(MultiplexedReplica, name="SoftPromptReplica", **options)
    router = serve.deployment(Router, name="SoftPromptRouter", ray_actor_options={"num_cpus": 0})
    return router.bind(replica.bind(model, str(prompts), base_name=base_name, dtype=dtype, device=device,
                                    max_tasks=max_tasks_per_replica, engine_options=engine_options or {},
                                    app_options=app_options, registry_name=registry_name),
                       affinity=affinity, registry_name=registry_name)


__all__ = ["READS_HEADER", "REPLICA_HEADER", "PromptRegistry", "Replica", "Router", "admin_change", "deployment",
           "task_of"]
