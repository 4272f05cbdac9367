"""Serving many tasks' soft prompts on one frozen base model: the prompt bank, mixed-task
batches (each row with its own task's prompt and template), the engine, dynamic batching
and the HTTP server.

The server's modules (FastAPI, uvicorn) load only with `create_app`."""

from typing import Any

from .batcher import Batcher, QueueFullError, TooManyRequestsForQueueError
from .bank import PromptBank
from .entry import BankEntry, UnknownTaskError, check_task_name
from .engine import Engine
from .request import ErrorKind, Request, Result
from .mixed import MixedBatch, encode_mixed, forward_mixed, generate_mixed
from .text import GenerationOptions, TokenStream

__all__ = ["create_app", "Batcher", "QueueFullError", "TooManyRequestsForQueueError", "Engine", "Request", "Result",
           "ErrorKind", "TokenStream", "GenerationOptions", "PromptBank",
           "BankEntry", "UnknownTaskError", "check_task_name", "MixedBatch", "encode_mixed", "forward_mixed",
           "generate_mixed"]


def create_app(*args: Any, **kwargs: Any):
    """See `softprompt.serve.app.create_app` (imported here on first use: FastAPI is heavy)."""
    from .app import create_app as make

    return make(*args, **kwargs)
