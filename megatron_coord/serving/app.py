"""OpenAI-compatible HTTP front end (FastAPI + uvicorn) for a running coordinator.

The server is one more coordinator client: it holds an ``InferenceClient`` (DEALER) and turns
each HTTP request into one engine request per prompt and candidate. Everything runs on uvicorn's
event loop, so thousands of open HTTP requests cost no threads.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (server-sent-event
streaming, ``n`` and ``best_of``, ``stop`` strings, ``seed``, log-probabilities with top-N
alternatives, ``echo`` with the prompt's log-probs, vLLM's ``prompt_logprobs`` and sampling
fields: ``top_k``, ``min_p``, penalties, ``logit_bias``, ``ignore_eos``, ``min_tokens``,
``stop_token_ids`` ...), ``GET /v1/models``, ``GET /health/live`` (200 while this server runs),
``GET /health/ready`` and its alias ``GET /health`` (503 unless connected to the coordinator
and a replica is alive and healthy), ``GET /metrics`` (Prometheus), ``POST
/v1/admin/update_weights`` (admin.py) and, with a tokenizer, vLLM's ``POST /tokenize`` and
``POST /detokenize``. Errors use OpenAI's JSON error shape: 400
bad request (a field out of bounds, a prompt past the context), 401 bad API key, 404 unknown
model, 405 wrong method (with ``Allow``), 413 body too large, 429 overloaded, 503 no replica,
504 timeout, 500 anything else. ``/openapi.json`` documents exactly these (schemathesis checks
it in the test suite). Valid OpenAI parameters that are not served (tools, suffix) are refused
rather than ignored.

Run on its own against a coordinator::

    python -m megatron_coord.serving --coordinator-address tcp://127.0.0.1:5555 --port 8000
"""

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import WithJsonSchema

from ..coordinator_stats import is_serving
from . import openai_protocol as oa
from . import schemas
from .admin import install_admin_routes
from .chat_template import render_chat_prompt
from .choices import build_choices
from .errors import install_error_handlers
from .inference import serve
from .metrics import CONTENT_TYPE_LATEST, ServingMetrics
from .openai_protocol import OpenAIError
from .openapi_doc import SECURED, install_openapi
from .responses import ChatFormat, CompletionFormat
from .schemas import route_responses
from .state import DEFAULT_MODEL_NAME, Guard, ServerOptions, ServerState, check_options
from .tokenize import install_tokenize_routes

INFERENCE_ERRORS = (400, 404, 413, 429, 500, 503, 504)


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

    app = FastAPI(
        title="megatron_coord OpenAI-compatible API",
        version="1",
        description=__doc__.split("\n\n")[2],
        lifespan=lifespan,
    )
    app.state.server = state
    app.add_middleware(Guard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    install_error_handlers(app)
    _install_inference_routes(app, state)
    _install_info_routes(app, state)
    install_admin_routes(app, state, *_v1(state, ()))
    install_tokenize_routes(app, state)
    install_openapi(app, api_key=bool(opts.api_key))
    return app


def _v1(state: ServerState, statuses: tuple[int, ...]) -> tuple[tuple[int, ...], dict]:
    """A /v1 route's error statuses and OpenAPI extras: 401 and the bearer key when one is
    required."""
    if state.opts.api_key:
        return (*statuses, 401), SECURED
    return statuses, {}


def _install_inference_routes(app: FastAPI, state: ServerState) -> None:
    completion_body = state.models.completion
    chat_body = state.models.chat
    statuses, extra = _v1(state, INFERENCE_ERRORS)

    @app.post(
        "/v1/completions",
        responses=route_responses(schemas.CompletionResponse, statuses, schemas.CompletionChunk),
        openapi_extra=extra,
    )
    async def completions(body: completion_body, request: Request) -> Response:
        endpoint = "completions"
        with _counting_refusals(state, endpoint):
            body.check_supported()
            max_new = body.max_tokens if body.max_tokens is not None else oa.DEFAULT_MAX_TOKENS
            choices = build_choices(state, body, body.prompts(), max_new)
        return await serve(
            state, request, endpoint, body, choices, CompletionFormat(state.opts.model_name)
        )

    @app.post(
        "/v1/chat/completions",
        responses=route_responses(
            schemas.ChatCompletionResponse, statuses, schemas.ChatCompletionChunk
        ),
        openapi_extra=extra,
    )
    async def chat_completions(body: chat_body, request: Request) -> Response:
        endpoint = "chat_completions"
        with _counting_refusals(state, endpoint):
            body.check_supported()
            try:
                prompt = render_chat_prompt(body.message_dicts(), state.tokenizer)
            except ValueError as exc:
                raise OpenAIError(400, str(exc), param="messages") from None
            max_new = body.max_new_tokens(state.opts.default_chat_max_tokens)
            choices = build_choices(state, body, [prompt], max_new, param="messages")
        return await serve(
            state, request, endpoint, body, choices, ChatFormat(state.opts.model_name)
        )


def _install_info_routes(app: FastAPI, state: ServerState) -> None:
    name = state.opts.model_name
    model_path = Annotated[
        Literal[name], Path(), WithJsonSchema({"type": "string", "enum": [name]})
    ]
    statuses, extra = _v1(state, ())

    @app.get(
        "/v1/models", responses=route_responses(schemas.ModelList, statuses), openapi_extra=extra
    )
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get(
        "/v1/models/{model:path}",
        responses=route_responses(schemas.ModelCard, (*statuses, 404)),
        openapi_extra=extra,
    )
    async def model(model: model_path) -> Response:
        return JSONResponse(_model_card(state))

    @app.get("/health/live", responses=route_responses(schemas.Live, ()))
    async def live() -> Response:
        """Liveness: this server answers (restart it if not); says nothing of the replicas."""
        return JSONResponse({"status": "live"})

    ready_responses = route_responses(schemas.Ready, (503,))

    @app.get("/health", responses=ready_responses)
    @app.get("/health/ready", responses=ready_responses)
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        state.metrics.update_from_stats(await state.stats.query(state.opts.stats_timeout_s))
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.opts.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "megatron_coord",
    }


@contextlib.contextmanager
def _counting_refusals(state: ServerState, endpoint: str) -> Iterator[None]:
    """Count a request refused before it reached the coordinator as ``invalid_request``."""
    try:
        yield
    except OpenAIError:
        state.metrics.observe_outcome(endpoint, "invalid_request")
        raise
