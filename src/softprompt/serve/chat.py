"""Chat messages as the text a task completes: the served tokenizer's chat template.

    render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    # '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'  (SmolLM2-Instruct's template)

The text fills the task's one template field, as a completion's prompt does, so the soft
prompt sits where the task's template puts it (``[P:8] {text}``: before the whole chat).

The task encoder adds the tokenizer's own leading special tokens (`encode.special_frame`:
a BOS where the tokenizer adds one) and reads field text with special-token text split
into ordinary tokens. A chat template that writes the BOS as text (Llama 3's
``{{ bos_token }}``) would then put a second, wrong "BOS" of ordinary tokens after the
real one: the leading ``bos_token`` text is dropped here. (The packaged SmolLM2-Instruct
tokenizer adds no BOS, and its template writes none.)
"""

from __future__ import annotations

from typing import Any

from ..errors import SoftPromptError


def render_chat(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The messages through the tokenizer's chat template, the assistant's turn opened,
    a leading BOS text dropped (the encoder adds the tokenizer's own).

    Raises:
        SoftPromptError: the tokenizer has no chat template, or the template refuses the
            messages (e.g. a template that wants user and assistant turns to alternate).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SoftPromptError(f"the served tokenizer ({type(tokenizer).__name__}) has no chat template: "
                              "send the prompt to /v1/completions instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's raise_exception, a template error: the client's messages
        raise SoftPromptError(f"the chat template refused the messages: {e}") from None
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


__all__ = ["render_chat"]
