"""The admin routes (off unless ``--admin``): ``PUT`` / ``DELETE /v1/prompts/{task}`` load,
replace and unload a task's prompt folder (a local folder under the prompt root, or an
fsspec URL: `io.remote`), and vLLM's ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
aliases in vLLM's terms; without ``--admin`` every one answers 403."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import HTTPException, Request as HTTPRequest
from fastapi.responses import PlainTextResponse

from ..errors import SoftPromptError
from ..io.remote import is_url
from .entry import UnknownTaskError, check_task_name
from .server import APIError, Server, _Body, server_of


class PromptBody(_Body):
    path: str


def refuse_base(server: Server, task: str, what: str) -> None:
    """409 for an admin change to the base model's own entry: the base is not a prompt."""
    try:
        server.bank.refuse_base_name(task, what)
    except SoftPromptError as e:
        raise APIError(409, str(e), "task") from None


async def load_prompt(task: str, body: PromptBody, request: HTTPRequest):
    server = server_of(request)
    try:
        check_task_name(task)
    except SoftPromptError as e:
        raise APIError(422, str(e), "task") from None
    refuse_base(server, task, "loaded as a task")
    if "\x00" in body.path:
        raise APIError(422, f"path {body.path!r} holds a NUL character, which no file name can", "path")
    root = server.prompt_root
    path: Path | str
    if is_url(body.path) or is_url(root):  # a prompt store at an fsspec URL (`io.remote`)
        path = body.path
        inside = is_url(root) and path.startswith(str(root).rstrip("/") + "/") and ".." not in path.split("/")
        if root is not None and not inside:
            raise APIError(403, f"path {body.path!r} is outside the prompt root {root}", "path")
    else:
        try:
            path = Path(body.path).expanduser().resolve()
        except (OSError, RuntimeError) as e:  # a symbolic link loop, an unknown ~user
            raise APIError(422, f"path {body.path!r} cannot be resolved: {e}", "path") from None
        if root is not None and root not in path.parents and path != root:
            raise APIError(403, f"path {body.path!r} is outside the prompt root {root}", "path")
    replaced = task in server.bank
    try:
        await asyncio.to_thread(server.bank.add, task, path, replace=True)
    except SoftPromptError as e:
        raise APIError(422, f"{body.path}: {e}", "path") from None
    return {"task": task, "status": "replaced" if replaced else "loaded"}


def unload_prompt(task: str, request: HTTPRequest):
    refuse_base(server_of(request), task, "removed")
    try:
        server_of(request).bank.remove(task)
    except UnknownTaskError as e:
        raise APIError(404, str(e), "task", "model_not_found") from None
    return {"task": task, "status": "removed"}


class LoadLoRAAdapterBody(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterBody(_Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's other key for an adapter; accepted, unused: prompts have names only


def _as_vllm(e: APIError) -> APIError:
    """An admin refusal in vLLM's terms: its field names, and 400 where ours is 422 (vLLM
    answers 400 for an adapter it cannot load)."""
    param = {"task": "lora_name", "path": "lora_path"}.get(e.param, e.param)
    return APIError(400 if e.status_code == 422 else e.status_code, str(e.detail), param, e.code)


async def load_lora_adapter(body: LoadLoRAAdapterBody, request: HTTPRequest) -> PlainTextResponse:
    """vLLM's ``POST /v1/load_lora_adapter``: `load_prompt`, with vLLM's body and answer. As
    vLLM does, a name already loaded is refused (400) unless ``load_inplace`` replaces it."""
    server = server_of(request)
    try:
        refuse_base(server, body.lora_name, "loaded as a task")
        if body.lora_name in server.bank and not body.load_inplace:
            raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded "
                                "(load_inplace: true replaces it).", "lora_name")
        await load_prompt(body.lora_name, PromptBody(path=body.lora_path), request)
    except APIError as e:
        raise _as_vllm(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


def unload_lora_adapter(body: UnloadLoRAAdapterBody, request: HTTPRequest) -> PlainTextResponse:
    """vLLM's ``POST /v1/unload_lora_adapter``: `unload_prompt` (404 for a name not loaded)."""
    try:
        unload_prompt(body.lora_name, request)
    except APIError as e:
        raise _as_vllm(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def admin_off():
    """Without --admin the routes take no body at all, so the answer is 403 whatever is sent
    (a route with a body model would parse, and answer 422 on, a body it then refuses)."""
    raise HTTPException(403, "admin endpoints are off: start the server with --admin to load and unload prompts")


ADMIN_ROUTES = [(["PUT"], "/v1/prompts/{task}", load_prompt), (["DELETE"], "/v1/prompts/{task}", unload_prompt),
                (["POST"], "/v1/load_lora_adapter", load_lora_adapter),
                (["POST"], "/v1/unload_lora_adapter", unload_lora_adapter)]
ADMIN_OFF_ROUTES = [(["PUT", "DELETE"], "/v1/prompts/{task}", admin_off),
                    (["POST"], "/v1/load_lora_adapter", admin_off), (["POST"], "/v1/unload_lora_adapter", admin_off)]
