"""Serving many tasks' soft prompts on one frozen base model: the prompt bank and
mixed-task batches (each row with its own task's prompt and template)."""

from .bank import BankEntry, PromptBank, UnknownTaskError, check_task_name
from .engine import Engine, Request, Result
from .mixed import MixedBatch, encode_mixed, forward_mixed, generate_mixed

__all__ = ["Engine", "Request", "Result", "PromptBank", "BankEntry", "UnknownTaskError", "check_task_name", "MixedBatch", "encode_mixed",
           "forward_mixed", "generate_mixed"]
