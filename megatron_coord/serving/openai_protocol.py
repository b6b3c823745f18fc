"""The OpenAI API's shapes: request validation, sampling-parameter mapping, response bodies.

Kept apart from the HTTP plumbing (``app``, ``serving``) so the mapping from OpenAI's fields to
Megatron's ``SamplingParams`` can be read -- and tested -- in one place. Request models forbid
unknown fields, as OpenAI's API does: a misspelt parameter is an error, not silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from ..sampling_params import SamplingParams

MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 16  # n: each choice is one engine request
MAX_PROMPTS = 64  # a batch of prompts in one /v1/completions call
MAX_ENGINE_REQUESTS = 256  # prompts x n: what one HTTP request may put on the engines

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
Prompt = StrictStr | TokenIds | list[StrictStr] | list[TokenIds]


class OpenAIError(Exception):
    """An error to send back in OpenAI's shape, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it."""
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(
    message: str, err_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    # Not in OpenAI's API, but vLLM and SGLang accept it (openai client: extra_body).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None) -> int | None:
        if value is not None and not -(2**63) <= value < 2**63:
            raise ValueError("seed must fit in a signed 64-bit integer")
        return value

    def check_supported(self) -> None:
        """Refuse valid OpenAI parameters this server does not implement (rather than ignore)."""
        if self.presence_penalty or self.frequency_penalty:
            raise OpenAIError(
                400, "presence and frequency penalties are not supported", param="presence_penalty"
            )
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )

    def wants_logprobs(self) -> bool:
        return False

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = DEFAULT_MAX_TOKENS
    echo: bool = False
    # Only 0 is served: the sampled tokens' log-probabilities (engines report no top-k lists).
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        if self.logprobs:
            raise OpenAIError(
                400,
                "only logprobs=0 (the sampled tokens' log-probabilities) is supported",
                param="logprobs",
            )
        if self.logprobs is not None and self.stream:
            raise OpenAIError(400, "logprobs are not supported when streaming", param="logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "best_of is not supported", param="best_of")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one entry per prompt of a batch."""
        p = self.prompt
        # Pydantic already checked that ``p`` is one of the four shapes, so the first element
        # tells which (no need to walk a long token list again).
        if isinstance(p, str):
            prompts: list[str | list[int]] = [p]
        elif p and isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise OpenAIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if any(len(x) == 0 for x in prompts):
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) * self.n > MAX_ENGINE_REQUESTS:
            raise OpenAIError(400, f"prompts x n must be at most {MAX_ENGINE_REQUESTS}", param="n")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: bool = False
    # Only 0/None is served: the sampled tokens' log-probabilities, no alternatives.
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise OpenAIError(
                400, "only top_logprobs=0 (no alternatives) is supported", param="top_logprobs"
            )
        if self.logprobs and self.stream:
            raise OpenAIError(400, "logprobs are not supported when streaming", param="logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise OpenAIError(400, "tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise OpenAIError(
                400, "only the text response_format is supported", param="response_format"
            )

    def wants_logprobs(self) -> bool:
        return self.logprobs

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def max_new_tokens(self, default: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens if self.max_tokens is not None else default


def to_sampling_params(
    req: _SamplingFields, max_new_tokens: int, choice_index: int, termination_id: int | None
) -> SamplingParams:
    """Megatron sampling parameters for one choice of ``req``.

    OpenAI's ``temperature=0`` (or ``top_p=0``) means greedy, which Megatron spells ``top_k=1``;
    OpenAI's ``top_p=1`` means "no nucleus filtering", which Megatron spells ``top_p=0``. With
    ``n > 1`` and a seed, choice ``i`` uses ``seed + i`` so the choices differ yet stay
    reproducible.
    """
    greedy = req.temperature == 0.0 or req.top_p == 0.0 or req.top_k == 1
    top_k = 1 if greedy else max(req.top_k or 0, 0)
    params = SamplingParams(
        temperature=1.0 if greedy else req.temperature,
        top_k=top_k,
        top_p=0.0 if greedy or req.top_p >= 1.0 else req.top_p,
        num_tokens_to_generate=max_new_tokens,
        termination_id=termination_id,
    )
    if req.seed is not None:
        params.seed = (req.seed + choice_index + 2**63) % 2**64 - 2**63
    if req.wants_logprobs():
        params.return_log_probs = True
        params.skip_prompt_log_probs = True  # only the generated tokens' are returned
    return params


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def completion_logprobs(tokens: list[str], log_probs: list[float]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for sampled tokens (``logprobs=0``): each
    entry of ``top_logprobs`` holds just the sampled token, as vLLM returns for 0."""
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": log_probs,
        "top_logprobs": [{t: lp} for t, lp in zip(tokens, log_probs, strict=True)],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[str], log_probs: list[float]) -> dict[str, Any]:
    """The chat ``logprobs`` object for sampled tokens (no alternatives)."""
    return {
        "content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, log_probs, strict=True)
        ]
    }


def chat_delta_choice(
    index: int, delta: dict[str, str], finish_reason: str | None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


# --------------------------------------------------------------------------- response shapes


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

    def response(
        self,
        results: list[Any],
        usage: dict[str, int],
        logprobs: list[dict[str, Any] | None] | None = None,
    ) -> dict[str, Any]:
        """The full answer; ``results`` have ``text`` and ``finish_reason`` (ChoiceResult),
        ``logprobs`` one ``logprobs_payload`` (or None) per result."""
        logprobs = logprobs or [None] * len(results)
        choices = [
            self._choice(i, r.text, r.finish_reason, lp)
            for i, (r, lp) in enumerate(zip(results, logprobs, strict=True))
        ]
        body = self._envelope(self.object_name, choices)
        body["usage"] = usage
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        chunk = self._chunk(None, False)
        chunk["usage"] = usage
        return chunk

    def opening_chunks(self, indices: list[int], include_usage: bool) -> list[dict[str, Any]]:
        return []

    def _choice(
        self, index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs_payload(self, tokens: list[str], log_probs: list[float]) -> dict[str, Any]:
        raise NotImplementedError

    def delta_chunk(self, index: int, text: str, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def _choice(
        self, index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        return completion_choice(index, text, finish_reason, logprobs)

    def logprobs_payload(self, tokens: list[str], log_probs: list[float]) -> dict[str, Any]:
        return completion_logprobs(tokens, log_probs)

    def delta_chunk(self, index: int, text: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(completion_choice(index, text, None), include_usage)

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(completion_choice(index, "", reason), include_usage)


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _choice(
        self, index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        return chat_choice(index, text, finish_reason, logprobs)

    def logprobs_payload(self, tokens: list[str], log_probs: list[float]) -> dict[str, Any]:
        return chat_logprobs(tokens, log_probs)

    def opening_chunks(self, indices: list[int], include_usage: bool) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [self._chunk(chat_delta_choice(i, delta, None), include_usage) for i in indices]

    def delta_chunk(self, index: int, text: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(chat_delta_choice(index, {"content": text}, None), include_usage)

    def finish_chunk(self, index: int, reason: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk(chat_delta_choice(index, {}, reason), include_usage)


class StopMatcher:
    """Applies OpenAI ``stop`` strings to text arriving piece by piece.

    ``feed`` returns the text that can be sent now: everything up to a stop string (which is
    not sent), holding back a tail that could still be the start of one. ``stopped`` says a
    stop string was found; ``flush`` returns what was held back once generation ends.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self.pending + text
        cut = _first_stop(buffer, self.stops)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return buffer[:cut]
        hold = self._held_tail(buffer)
        self.pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best


def _first_stop(text: str, stops: list[str]) -> int:
    """Where ``text`` is cut: the start of the stop string that is complete first (the one
    ending earliest, the longest of those), or -1.

    "Complete first" is what a generation that stops on a stop string does: with stops "c" and
    "aca", the text "ac..." stops at "c" before "aca" could ever be generated. Deciding by end
    position makes the result the same however the text was split into pieces.
    """
    best_end, best_start = len(text) + 1, -1
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        end = start + len(stop)
        if end < best_end or (end == best_end and start < best_start):
            best_end, best_start = end, start
    return best_start
