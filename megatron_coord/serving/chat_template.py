"""Turning OpenAI chat messages into one prompt string.

A tokenizer that carries a chat template (Hugging Face ``chat_template``) renders the messages
itself, so a chat-tuned checkpoint sees exactly the format it was trained on. Tokenizers without
one (GPT-2, ByT5, the embedded default model) get a simple, documented default template, so the
chat endpoint still works on any model.
"""

from __future__ import annotations

from typing import Any

# The default template: one block per message, then an open assistant block for the model to
# continue. Role markers on their own lines keep turns apart for any tokenizer.
DEFAULT_ROLE_PREFIX = "<|{role}|>\n"
DEFAULT_MESSAGE_SUFFIX = "\n"
DEFAULT_GENERATION_PROMPT = "<|assistant|>\n"

ROLES = ("system", "developer", "user", "assistant", "tool")


def render_default_template(
    messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """Render ``[{"role", "content"}, ...]`` with the default template, ending in an open
    assistant turn (unless ``add_generation_prompt`` is False)."""
    parts = [
        DEFAULT_ROLE_PREFIX.format(role=m["role"]) + m["content"] + DEFAULT_MESSAGE_SUFFIX
        for m in messages
    ]
    if add_generation_prompt:
        parts.append(DEFAULT_GENERATION_PROMPT)
    return "".join(parts)


def tokenizer_chat_template(tokenizer: Any) -> Any | None:
    """The Hugging Face tokenizer behind ``tokenizer`` if it has a chat template, else None."""
    for candidate in (getattr(tokenizer, "hf_tokenizer", None), tokenizer):
        if (
            candidate is not None
            and getattr(candidate, "chat_template", None)
            and hasattr(candidate, "apply_chat_template")
        ):
            return candidate
    return None


def render_chat_prompt(
    messages: list[dict[str, str]],
    tokenizer: Any | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for ``messages``: the tokenizer's own chat template when it has one,
    the default template otherwise. Raises ValueError on messages the template rejects."""
    if not messages:
        raise ValueError("messages must not be empty")
    hf = tokenizer_chat_template(tokenizer) if tokenizer is not None else None
    if hf is None:
        return render_default_template(messages, add_generation_prompt)
    try:
        text = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja errors (e.g. "roles must alternate") are the caller's fault
        raise ValueError(f"the model's chat template rejected the messages: {exc}") from None
    if not isinstance(text, str):
        raise ValueError("the model's chat template did not produce text")
    return text
