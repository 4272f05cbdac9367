"""lm-evaluation-harness in process: a task's prompt folder scored on lm-eval's task registry
without a server (the `eval` extra).

    lm = SoftPromptLM(bank, "sst2")          # a PromptBank holding the task (or the base's own name)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
    softprompt eval --harness hellaswag,arc_easy --prompt runs/sst2/prompt   # the same from the CLI

The requests go through the serving engine (`serve.Engine.run`, in batches of
`batch_size`), as the server's do: a log-likelihood is a completion of token ids with
``echo`` and ``logprobs`` (`serve.scoring`: each of the prompt's own tokens scored, never
the virtual tokens), so its scores equal lm-eval's ``local-completions`` against
`softprompt serve` on the same task, token for token (`tests/test_lm_eval.py`).
``generate_until`` is a greedy completion of the context's token ids cut at the first of
the request's ``until`` strings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .encode import TokenIds
from .errors import ConfigError
from .extras import require

lm_eval_model = require("lm_eval.api.model", "eval", "lm-eval's in-process model")
lm_eval_utils = require("lm_eval.utils", "eval", "lm-eval's in-process model")


class SoftPromptLM(lm_eval_model.TemplateLM):
    """lm-eval's model interface over one task of a `PromptBank` (causal LMs).

    Args:
        bank: the tasks; `task` must be one of them (or the base model's own name).
        task: the task whose prompt every request goes through.
        batch_size: requests per engine run.
        max_length: most tokens of a request's own (the task's virtual tokens come besides;
            default: the base's positions less the task's prompt).
    """

    def __init__(self, bank, task: str, batch_size: int = 64, max_length: int | None = None):
        from .serve import Engine

        super().__init__()
        if task not in bank:
            raise ConfigError(f"task {task!r} is not in the bank; it holds {bank.names()}")
        entry = bank[task]
        if len(entry.model.template.fields) != 1:
            raise ConfigError(f"task {task!r} has template fields {list(entry.model.template.fields)}: lm-eval's "
                              "requests fill one text field")
        self.bank, self.task, self.batch_size = bank, task, int(batch_size)
        self.engine = Engine(bank)
        self.tokenizer = bank.tokenizer
        positions = entry.model.spec.max_positions or 2048
        self.max_length = max_length or max(positions - entry.model.num_virtual_tokens - 1, 1)

    # -- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Per request ((context, continuation), context ids, continuation ids): the
        continuation's log-probability given the context, and whether each of its tokens
        was the most likely one."""
        from .serve import Request

        work = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-self.max_length:]
            work.append((TokenIds(ids), len(ids) - len(continuation)))
        options = dataclasses.replace(_options(logprobs=1), max_new_tokens=0)
        out: list[tuple[float, bool]] = []
        for start in range(0, len(work), self.batch_size):
            chunk = work[start: start + self.batch_size]
            results = self.engine.run([Request(self.task, ids, generate=True, options=options, echo=True)
                                       for ids, _ in chunk])
            for (ids, first), result in zip(chunk, results):
                if not result.ok:
                    raise RuntimeError(f"lm-eval request of {len(ids)} tokens failed: {result.error}")
                scored = result.prompt_logprobs[max(first, 1):]  # entry 0 has none: a context of one token at least
                out.append((sum(e.logprob for e in scored),
                            all(e.top and e.top[0][0] == e.token for e in scored)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood, in disjoint windows of `max_length` tokens
        (lm-eval's rolling windows, as its Hugging Face model does)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's greedy completion (``max_gen_toks`` tokens at most, 256 by
        default), cut before the first of its ``until`` strings."""
        from .serve import Request

        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [req.args for req in requests[start: start + self.batch_size]]
            batch = []
            for context, kwargs in chunk:
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                budget = int(kwargs.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-max(self.max_length - budget, 1):]
                batch.append((Request(self.task, TokenIds(ids), generate=True,
                                      options=_options(max_new_tokens=budget, stop=until[:4] or None)), until))
            for (request, until), result in zip(batch, self.engine.run([r for r, _ in batch])):
                if not result.ok:
                    raise RuntimeError(f"lm-eval generation failed: {result.error}")
                out.append(_cut(result.output, until))
        return out


def _options(**values: Any):
    from .serve.text import GenerationOptions

    return GenerationOptions.parse({"temperature": 0, **values})


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` before the first of the `until` strings (the engine cuts at 4 stop strings:
    lm-eval may give more)."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def evaluate_harness(bank, task: str, harness_tasks: Sequence[str], *, batch_size: int = 64,
                     limit: int | None = None, include_path: str | None = None) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `harness_tasks` (its registry's names, or tasks under
    `include_path`) on the bank's `task`: its results section (per task, each metric)."""
    evaluator = require("lm_eval", "eval", "softprompt eval --harness")
    tasks_module = require("lm_eval.tasks", "eval", "softprompt eval --harness")
    manager = tasks_module.TaskManager(include_path=include_path) if include_path else None
    out = evaluator.simple_evaluate(model=SoftPromptLM(bank, task, batch_size=batch_size), tasks=list(harness_tasks),
                                    limit=limit, task_manager=manager)
    return out["results"]


def evaluate_folder(harness_tasks: Sequence[str], *, prompt: str | None = None, model: str | None = None,
                    batch_size: int = 64, limit: int | None = None, include_path: str | None = None) -> dict[str, Any]:
    """``softprompt eval --harness``: `evaluate_harness` of the trained prompt at `prompt`
    (on its recorded base, or `model`), or of the base `model` alone (no prompt)."""
    from .serve import PromptBank

    if prompt is not None:
        from .folder import load_recorded_base

        directory, _, base, tokenizer = load_recorded_base(prompt, model=model)
        bank, name = PromptBank(base, tokenizer), "prompt"
        bank.add(name, directory)
    elif model is not None:
        from .base_models import load_base, resolve_device

        base, tokenizer = load_base(model)
        base.to(resolve_device("auto"))
        bank, name = PromptBank(base, tokenizer), "base"
        bank.add_base(name)
    else:
        raise ConfigError("--harness needs --prompt DIR (a trained prompt) or --model M (the base alone)")
    return evaluate_harness(bank, name, harness_tasks, batch_size=batch_size, limit=limit, include_path=include_path)


__all__ = ["SoftPromptLM", "evaluate_harness", "evaluate_folder"]
