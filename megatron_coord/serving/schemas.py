"""The answers' shapes, for the OpenAPI document: 200 bodies, stream chunks, every error.

The server builds its answers as plain dicts (``responses``, ``logprobs``, ``app``); these
models only describe them, so a generated client or a schema-driven tester (schemathesis, in
the test suite) can trust the document. ``route_responses`` gives a route's documented answers:
its 200 model (and ``text/event-stream`` for streams) and the error body for each status it
sends.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(ge=0, description="prompt tokens served from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy log-probs; with echo the prompt's tokens come first (the first null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = Field(description="1 for the likeliest; null: not among those reported")
    decoded_token: str | None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None = Field(
        None, description="vLLM's: only when prompt_logprobs was asked for"
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(
        None, description="vLLM's: only when prompt_logprobs was asked for"
    )


class CompletionChunk(BaseModel):
    """One server-sent event of a /v1/completions stream (the last, with include_usage,
    has no choices and the usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a /v1/chat/completions stream."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None


# Models the document refers to only from event streams (openapi_doc adds them).
STREAM_MODELS = (CompletionChunk, ChatCompletionChunk)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Live(BaseModel):
    status: Literal["live"]


class Ready(BaseModel):
    status: Literal["ok"]
    replicas: int = Field(ge=0)
    replicas_alive: int = Field(ge=1)


class TokenizeResponse(BaseModel):
    """vLLM's /tokenize answer."""

    count: int = Field(ge=0)
    max_model_len: int | None = Field(description="the model's context; null: not known here")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    """vLLM's /detokenize answer."""

    prompt: str


STATUS_MEANINGS = {
    400: "invalid request: a field out of its bounds, a prompt past the context, a prompt "
    "the coordinator or engine refused",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    429: "overloaded: too many requests running",
    500: "internal error: the engine failed the request",
    503: "no model replica can serve (none alive, coordinator unreachable, shutting down)",
    504: "not answered within the server's request timeout",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """The ``text/event-stream`` content of a stream: each event's data a ``chunk`` (or, when
    a choice failed after streaming began, an error) as JSON, the last one ``[DONE]``."""
    payload = {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {
                "type": "string",
                "not": {"const": "[DONE]"},
                "contentMediaType": "application/json",
                "contentSchema": payload,
            },
        ]
    }
    return {
        "text/event-stream": {
            "schema": {"type": "object", "required": ["data"], "properties": {"data": data}}
        }
    }


def route_responses(
    ok: type[BaseModel] | None,
    statuses: tuple[int, ...],
    stream: type[BaseModel] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=``: the 200 model (and the event stream of ``stream`` chunks) and
    each error status."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": STATUS_MEANINGS[status]}
        for status in statuses
    }
    if ok is not None:
        out[200] = {"model": ok, "description": "success"}
        if stream is not None:
            out[200]["content"] = event_stream(stream)
    return out
