"""OpenAI's response bodies and stream chunks, for /v1/completions and /v1/chat/completions.

Built as plain dicts (the hot path: no model validation per answer); ``schemas`` describes the
same shapes for the OpenAPI document.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass
class ChoiceOut:
    """One choice of an answer: its text and, when asked for, its log-probabilities."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[Any] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseFormat:
    """OpenAI's response and stream-chunk shapes for one endpoint."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, model: str) -> None:
        self.id = new_id(self.id_prefix)
        self.created = now()
        self.model = model

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(self, choice: dict[str, Any] | None, include_usage: bool) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object_name, [choice] if choice is not None else [])
        if include_usage:
            chunk["usage"] = None
        return chunk

    def response(self, choices: list[ChoiceOut], usage: dict[str, Any]) -> dict[str, Any]:
        """The full answer."""
        body = self._envelope(self.object_name, [self._choice(c) for c in choices])
        body["usage"] = usage
        return body

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        chunk = self._chunk(None, False)
        chunk["usage"] = usage
        return chunk

    def opening_chunks(self, indices: list[int], include_usage: bool) -> list[dict[str, Any]]:
        return []

    def _choice(self, choice: ChoiceOut) -> dict[str, Any]:
        raise NotImplementedError

    def delta_chunk(self, index: int, text: str, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def whole_chunk(self, choice: ChoiceOut, include_usage: bool) -> dict[str, Any]:
        """A choice complete in one chunk (its log-probs with it), before its finish chunk."""
        raise NotImplementedError

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError


def completion_choice(choice: ChoiceOut) -> dict[str, Any]:
    out = {
        "index": choice.index,
        "text": choice.text,
        "logprobs": choice.logprobs,
        "finish_reason": choice.finish_reason,
    }
    if choice.prompt_logprobs is not None:
        out["prompt_logprobs"] = choice.prompt_logprobs
    return out


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, choice: ChoiceOut) -> dict[str, Any]:
        return completion_choice(choice)

    def delta_chunk(self, index: int, text: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(completion_choice(ChoiceOut(index, text, None)), include_usage)

    def whole_chunk(self, choice: ChoiceOut, include_usage: bool) -> dict[str, Any]:
        unfinished = ChoiceOut(
            choice.index, choice.text, None, choice.logprobs, choice.prompt_logprobs
        )
        return self._chunk(completion_choice(unfinished), include_usage)

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(completion_choice(ChoiceOut(index, "", reason)), include_usage)


def chat_delta_choice(
    index: int,
    delta: dict[str, str],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def response(self, choices: list[ChoiceOut], usage: dict[str, Any]) -> dict[str, Any]:
        body = super().response(choices, usage)
        if choices and choices[0].prompt_logprobs is not None:  # vLLM: one, for the prompt
            body["prompt_logprobs"] = choices[0].prompt_logprobs
        return body

    def _choice(self, choice: ChoiceOut) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": choice.logprobs,
            "finish_reason": choice.finish_reason,
        }

    def opening_chunks(self, indices: list[int], include_usage: bool) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [self._chunk(chat_delta_choice(i, delta, None), include_usage) for i in indices]

    def delta_chunk(self, index: int, text: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(chat_delta_choice(index, {"content": text}, None), include_usage)

    def whole_chunk(self, choice: ChoiceOut, include_usage: bool) -> dict[str, Any]:
        delta = chat_delta_choice(choice.index, {"content": choice.text}, None, choice.logprobs)
        chunk = self._chunk(delta, include_usage)
        if choice.prompt_logprobs is not None:
            chunk["prompt_logprobs"] = choice.prompt_logprobs
        return chunk

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(chat_delta_choice(index, {}, reason), include_usage)
