"""OpenAI-compatible HTTP front end (FastAPI + uvicorn) for a running coordinator.

The server is one more coordinator client: it holds an ``InferenceClient`` (DEALER) and turns
each HTTP request into one engine request per prompt and choice. Everything runs on uvicorn's
event loop, so thousands of open HTTP requests cost no threads.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with server-sent-event
streaming, ``n`` choices, ``stop`` strings, ``seed``, and the sampled tokens' log-probabilities
when not streaming), ``GET /v1/models``, ``GET /health/live`` (200 while this server runs),
``GET /health/ready`` and its alias ``GET /health`` (503 unless connected to the coordinator
and a replica is alive and healthy) and ``GET /metrics`` (Prometheus). Errors use OpenAI's JSON error shape: 400 bad request, 401 bad
API key, 404 unknown model, 413 body too large, 429 overloaded, 503 no replica, 504 timeout,
500 anything else. Valid OpenAI parameters that are not served (penalties, logit_bias, echo,
top-k log-probability lists, tools) are refused with 400 rather than ignored.

Run on its own against a coordinator::

    python -m megatron_coord.serving --coordinator-address tcp://127.0.0.1:5555 --port 8000
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..coordinator_stats import is_serving
from . import openai_protocol as oa
from .chat_template import render_chat_prompt
from .errors import install_error_handlers
from .inference import Choice, serve
from .metrics import CONTENT_TYPE_LATEST, ServingMetrics
from .openai_protocol import OpenAIError
from .state import DEFAULT_MODEL_NAME, Guard, ServerOptions, ServerState, check_options


def create_app(
    coordinator_address: str,
    tokenizer: Any | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    metrics: ServingMetrics | None = None,
    **options: Any,
) -> FastAPI:
    """Build the FastAPI app serving the OpenAI API from the coordinator at ``coordinator_address``.

    ``tokenizer`` (optional, Megatron or Hugging Face interface) supplies the chat template and
    the end-of-text id; without it the coordinator's tokenizer does all tokenizing and chat uses
    the default template. ``options`` are ``ServerOptions`` fields.
    """
    check_options(options)
    opts = ServerOptions(model_name=model_name, **options)
    metrics = metrics if metrics is not None else ServingMetrics()
    state = ServerState(coordinator_address, tokenizer, opts, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="megatron_coord OpenAI-compatible API", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(Guard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    install_error_handlers(app)
    _install_routes(app, state)
    return app


def _install_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request) -> Response:
        endpoint = "completions"
        with _counting_refusals(state, endpoint):
            _check_request(state, body)
            body.check_supported()
            max_new = body.max_tokens if body.max_tokens is not None else oa.DEFAULT_MAX_TOKENS
            choices = _choices(state, body, body.prompts(), max_new)
        return await serve(
            state, request, endpoint, body, choices, oa.CompletionFormat(state.opts.model_name)
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Response:
        endpoint = "chat_completions"
        with _counting_refusals(state, endpoint):
            _check_request(state, body)
            body.check_supported()
            try:
                prompt = render_chat_prompt(body.message_dicts(), state.tokenizer)
            except ValueError as exc:
                raise OpenAIError(400, str(exc), param="messages") from None
            max_new = body.max_new_tokens(state.opts.default_chat_max_tokens)
            choices = _choices(state, body, [prompt], max_new)
        return await serve(
            state, request, endpoint, body, choices, oa.ChatFormat(state.opts.model_name)
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != state.opts.model_name:
            raise _unknown_model(model)
        return _model_card(state)

    @app.get("/health/live")
    async def live() -> Response:
        """Liveness: this server answers (restart it if not); says nothing of the replicas."""
        return JSONResponse({"status": "live"})

    @app.get("/health")
    @app.get("/health/ready")
    async def ready() -> Response:
        """Readiness: connected to the coordinator, which has a healthy replica (503 if not)."""
        if not state.backend.connected:
            raise OpenAIError(
                503,
                f"not connected to the coordinator at {state.backend.address} (reconnecting)",
                "service_unavailable",
                code="no_coordinator",
            )
        stats = await state.stats.query(state.opts.stats_timeout_s)
        if stats is None:
            raise OpenAIError(
                503, "the coordinator did not answer", "service_unavailable", code="no_coordinator"
            )
        engines = [e for e in stats.get("engines") or [] if isinstance(e, dict)]
        alive = sum(1 for e in engines if is_serving(e))
        if alive == 0:
            raise OpenAIError(
                503, "no model replica is alive", "service_unavailable", code="no_engine"
            )
        return JSONResponse({"status": "ok", "replicas": len(engines), "replicas_alive": alive})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.update_from_stats(await state.stats.query(state.opts.stats_timeout_s))
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.opts.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "megatron_coord",
    }


def _unknown_model(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"the model {model!r} does not exist",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


@contextlib.contextmanager
def _counting_refusals(state: ServerState, endpoint: str) -> Any:
    """Count a request refused before it reached the coordinator as ``invalid_request``."""
    try:
        yield
    except OpenAIError:
        state.metrics.observe_outcome(endpoint, "invalid_request")
        raise


def _check_request(state: ServerState, body: oa._SamplingFields) -> None:
    if body.model != state.opts.model_name:
        raise _unknown_model(body.model)
    limit = state.opts.max_tokens_limit
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is not None and wanted is not None and wanted > limit:
        raise OpenAIError(400, f"max_tokens must be <= {limit}", param="max_tokens")


def _choices(
    state: ServerState, body: oa._SamplingFields, prompts: list[str | list[int]], max_new: int
) -> list[Choice]:
    return [
        Choice(
            p * body.n + j,
            prompt,
            oa.to_sampling_params(body, max_new, j, state.termination_id),
            counts_prompt=j == 0,
        )
        for p, prompt in enumerate(prompts)
        for j in range(body.n)
    ]
