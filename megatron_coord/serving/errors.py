"""HTTP errors in OpenAI's shape: the coordinator's error codes mapped to statuses, and the
app's exception handlers (validation, unknown routes, internal errors)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_protocol as oa
from .generation import GenerationError
from .openai_protocol import OpenAIError

log = logging.getLogger("megatron_coord.serving")


# ErrorCode value from the coordinator -> (HTTP status, OpenAI error type, metrics outcome).
ERROR_MAP = {
    "invalid_request": (400, "invalid_request_error", "invalid_request"),
    "malformed": (400, "invalid_request_error", "invalid_request"),
    "duplicate_request_id": (400, "invalid_request_error", "invalid_request"),
    "overloaded": (429, "rate_limit_error", "overloaded"),
    "no_engine": (503, "service_unavailable", "no_replica"),
    "shutting_down": (503, "service_unavailable", "no_replica"),
    "no_coordinator": (503, "service_unavailable", "no_replica"),
    "timeout": (504, "timeout", "timeout"),
}


def openai_error(exc: GenerationError) -> tuple[OpenAIError, str]:
    """The HTTP error for a failed generation, and its metrics outcome."""
    status, err_type, outcome = ERROR_MAP.get(exc.code, (500, "server_error", "error"))
    return OpenAIError(status, exc.message, err_type, code=exc.code), outcome


def timeout_error() -> OpenAIError:
    return OpenAIError(504, "the request timed out", "timeout", code="timeout")


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        _count_invalid(request)
        unknown = _unknown_model(errors)
        if unknown is not None:
            return error_response(unknown_model_error(unknown))
        errors = _telling(errors)
        first = errors[0] if errors else {}
        loc = _location(first)
        context = request.app.state.server.limits.max_model_len
        described = dict.fromkeys(_describe_validation(e, context) for e in errors)
        message = "; ".join(list(described)[:5]) or "invalid request"
        return error_response(OpenAIError(400, message, param=loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = oa.error_body(str(exc.detail), err_type)
        # 405 carries Allow (the methods the path serves), as Starlette's router sets it.
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error: %s", exc)
        return error_response(OpenAIError(500, "internal server error", "server_error"))


def unknown_model_error(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"the model {model!r} does not exist",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def _unknown_model(errors: list[dict[str, Any]]) -> str | None:
    """The model name a request gave that this server does not serve (a string ``model``
    that failed the served-name check), if any: OpenAI answers that with 404, not 400."""
    for error in errors:
        loc = error.get("loc", ())
        name = error.get("input")
        if (
            loc
            and loc[-1] == "model"
            and error.get("type") == "literal_error"
            and isinstance(name, str)
        ):
            return name
    return None


def _location(error: dict[str, Any]) -> list[str]:
    """Where an error is, in the request's terms: field names and list indices, without the
    request part (body, path) and the names pydantic gives union members (``constrained-int``,
    ``function-after[...]``, ``list[...]``)."""
    return [
        str(p)
        for p in error.get("loc", ())
        if p not in ("body", "path", "query")
        and not (isinstance(p, str) and ("-" in p or "[" in p))
    ]


_MISMATCH = {"string_type", "list_type", "int_type", "float_type", "dict_type", "bool_type"}


def _telling(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors that say what is wrong: a union (a prompt is a string or token lists, an
    integer an int or an integral float) reports every member that did not match; where a
    member came close (a bound, a value), the others' type mismatches are noise."""
    if len(errors) < 2:
        return errors
    errors = [
        e
        for e in errors
        if not any(str(p).startswith("function-plain") for p in e.get("loc", ()))
        or isinstance(e.get("input"), float)
    ] or errors
    close = [e for e in errors if e.get("type") not in _MISMATCH]
    return close or errors


_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


def _describe_validation(error: dict[str, Any], context: int | None = None) -> str:
    loc = ".".join(_location(error))
    bound = (error.get("ctx") or {}).get("le")
    if context is not None and loc in _MAX_TOKENS_FIELDS and bound == context - 1:
        return (
            f"{loc} is {error.get('input')}, but this model's context length is {context} "
            f"tokens, the prompt included (at most {context - 1} new tokens)"
        )
    return f"{loc}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg", "invalid"))


_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}


def _count_invalid(request: Request) -> None:
    endpoint = _ENDPOINTS.get(request.url.path)
    if endpoint is not None:
        request.app.state.server.metrics.observe_outcome(endpoint, "invalid_request")
