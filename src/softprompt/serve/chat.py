"""Chat messages as the text a task completes: the served tokenizer's chat template.

    render_chat(tokenizer, [{"role": "user", "content": "hi"}], entry.model.encoder.lead)
    # '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'  (SmolLM2-Instruct's template)

The text fills the task's one template field, as a completion's prompt does, so the soft
prompt sits where the task's template puts it (``[P:8] {text}``: before the whole chat).

The task encoder puts the tokenizer's own leading special tokens before the row
(`TemplateEncoder.lead`, from `encode.special_frame`: a BOS where the tokenizer adds one)
and reads field text with special-token text split into ordinary tokens. A chat template
that writes the BOS as text (Llama 3's ``{{ bos_token }}``) for a tokenizer that also adds
one would give the real BOS and then a second one as ordinary tokens: the leading
``bos_token`` text is dropped then, and only then. The packaged SmolLM2-Instruct tokenizer
adds nothing (its lead is empty) and names ``<|im_start|>`` its BOS: dropping the text
unconditionally would cut the first turn's marker.
"""

from __future__ import annotations

from typing import Any

from ..errors import SoftPromptError


def render_chat(tokenizer, messages: list[dict[str, Any]], lead: list[int], add_generation_prompt: bool = True) -> str:
    """The messages through the tokenizer's chat template, the assistant's turn opened
    (unless not `add_generation_prompt`); `lead`: the token ids the task encoder puts
    before the row (its BOS, if any): a leading BOS text is dropped when the encoder adds
    that BOS itself.

    Raises:
        SoftPromptError: the tokenizer has no chat template, or the template refuses the
            messages (e.g. a template that wants user and assistant turns to alternate).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SoftPromptError(f"the served tokenizer ({type(tokenizer).__name__}) has no chat template: "
                              "send the prompt to /v1/completions instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception, a template error: the client's messages
        raise SoftPromptError(f"the chat template refused the messages: {e}") from None
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos and text.startswith(bos) and lead[:1] == [bos_id]:
        text = text[len(bos):]
    return text


__all__ = ["render_chat"]
