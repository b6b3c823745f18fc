"""OpenAI-compatible HTTP front end (FastAPI + uvicorn) for a running coordinator.

The server is one more coordinator client: it holds an ``InferenceClient`` (DEALER) and turns
each HTTP request into one engine request per prompt and choice. Everything runs on uvicorn's
event loop, so thousands of open HTTP requests cost no threads.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with server-sent-event
streaming, ``n`` choices, ``stop`` strings, ``seed``, and the sampled tokens' log-probabilities
when not streaming), ``GET /v1/models``, ``GET /health`` (503 unless a replica is alive) and
``GET /metrics`` (Prometheus). Errors use OpenAI's JSON error shape: 400 bad request, 401 bad
API key, 404 unknown model, 413 body too large, 429 overloaded, 503 no replica, 504 timeout,
500 anything else. Valid OpenAI parameters that are not served (penalties, logit_bias, echo,
top-k log-probability lists, tools) are refused with 400 rather than ignored.

Run on its own against a coordinator::

    python -m megatron_coord.http_server --coordinator-address tcp://127.0.0.1:5555 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_protocol as oa
from .chat_template import render_chat_prompt
from .coordinator_stats import CoordinatorStats
from .generation import ChoiceResult, CoordinatorBackend, GenerationError, run_choice
from .metrics import CONTENT_TYPE_LATEST, ServingMetrics
from .openai_protocol import OpenAIError
from .protocol import DEFAULT_MAX_MESSAGE_BYTES
from .sampling_params import SamplingParams
from .tokenizer import as_megatron_tokenizer

log = logging.getLogger(__name__)

# Ways to run the app (uvicorn on this thread, a background thread, or a process) live in
# http_runner; they are re-exported here, where users look for them.
_RUNNERS = {"serve_http", "HTTPServerThread", "HTTPServerProcess", "bind_socket"}


def __getattr__(name: str) -> Any:
    if name in _RUNNERS:
        from . import http_runner

        return getattr(http_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEFAULT_MODEL_NAME = "megatron_coord"


@dataclass
class ServerOptions:
    """Knobs of the HTTP front end (all have safe defaults)."""

    model_name: str = DEFAULT_MODEL_NAME
    # Above this many concurrent inference requests the server answers 429 (None: no limit).
    max_concurrent_requests: int | None = None
    # An inference request that takes longer is aborted and answered 504 (None: no limit).
    request_timeout_s: float | None = 600.0
    # max_tokens when a chat request gives none (OpenAI's own default is "up to the context").
    default_chat_max_tokens: int = 256
    # Requests asking for more new tokens are refused with 400 (None: the engine decides).
    max_tokens_limit: int | None = None
    # How long /health and /metrics wait for the coordinator's STATS reply.
    stats_timeout_s: float = 1.0
    # How long startup waits for the coordinator to acknowledge CONNECT.
    connect_timeout_s: float = 30.0
    # When set, /v1/* requires "Authorization: Bearer <api_key>" (/health, /metrics stay open).
    api_key: str | None = None
    # Request bodies above this are refused with 413 before they are read into memory.
    max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def check_options(options: dict[str, Any]) -> None:
    """Raise TypeError naming any key of ``options`` that is not a ``ServerOptions`` field."""
    unknown = set(options) - set(ServerOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown HTTP server options: {sorted(unknown)}")


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
    state = _ServerState(coordinator_address, tokenizer, opts, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="megatron_coord OpenAI-compatible API", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(_Guard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    _install_error_handlers(app)
    _install_routes(app, state)
    return app


class _ServerState:
    """What the routes share: the backend, the STATS querier, metrics, the concurrency count."""

    def __init__(
        self, address: str, tokenizer: Any | None, opts: ServerOptions, metrics: ServingMetrics
    ) -> None:
        self.tokenizer = as_megatron_tokenizer(tokenizer) if tokenizer is not None else None
        eod = getattr(self.tokenizer, "eod", None)
        # The end-of-text id, if the tokenizer says: every request's termination id.
        self.termination_id: int | None = eod if isinstance(eod, int) else None
        self.opts = opts
        self.metrics = metrics
        self.backend = CoordinatorBackend(
            address,
            eod_text=_eod_text(self.tokenizer, self.termination_id),
            connect_timeout_s=opts.connect_timeout_s,
        )
        self.stats = CoordinatorStats(address)
        self.running = 0
        self.created = oa.now()

    async def start(self) -> None:
        await self.backend.start()  # raises TimeoutError after connect_timeout_s

    async def stop(self) -> None:
        self.backend.stop()
        self.stats.close()

    def acquire(self, endpoint: str) -> None:
        """Count one more running request, refusing with 429 above ``max_concurrent_requests``."""
        limit = self.opts.max_concurrent_requests
        if limit is not None and self.running >= limit:
            self.metrics.observe_outcome(endpoint, "overloaded")
            raise OpenAIError(
                429,
                f"the server is busy ({limit} requests running); retry later",
                "rate_limit_error",
                code="overloaded",
            )
        self.running += 1
        self.metrics.requests_running.inc()

    def release(self) -> None:
        self.running -= 1
        self.metrics.requests_running.dec()

    def deadline(self) -> float | None:
        timeout = self.opts.request_timeout_s
        return None if timeout is None else time.monotonic() + timeout


def _eod_text(tokenizer: Any | None, eod: int | None) -> str | None:
    """The end-of-text token ``eod`` as text (cut from generated text)."""
    if eod is None:
        return None
    try:
        return tokenizer.detokenize([eod]) or None
    except Exception:
        return None


class _Guard:
    """ASGI middleware in front of every route: the API key and the request-body size limit.

    Both are checked before FastAPI reads the body, so an unauthenticated or oversized request
    costs the server nothing but its headers.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await _error_response(refusal)(scope, receive, send)
        await self.app(scope, self._limited(receive), send)

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> OpenAIError | None:
        if self.expected is not None and path.startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return OpenAIError(401, "invalid or missing API key", code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"request body over {self.max_body_bytes} bytes", code="too_large")

    def _limited(self, receive: Any) -> Any:
        """``receive`` that refuses a chunked body once it grows past the limit."""
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:  # FastAPI re-raises HTTPException from body reads
                raise HTTPException(413, self._too_large().message)
            return message

        return limited


# --------------------------------------------------------------------------- errors

# ErrorCode value from the coordinator -> (HTTP status, OpenAI error type, metrics outcome).
_ERROR_MAP = {
    "invalid_request": (400, "invalid_request_error", "invalid_request"),
    "malformed": (400, "invalid_request_error", "invalid_request"),
    "duplicate_request_id": (400, "invalid_request_error", "invalid_request"),
    "overloaded": (429, "rate_limit_error", "overloaded"),
    "no_engine": (503, "service_unavailable", "no_replica"),
    "shutting_down": (503, "service_unavailable", "no_replica"),
    "timeout": (504, "timeout", "timeout"),
}


def _openai_error(exc: GenerationError) -> tuple[OpenAIError, str]:
    """The HTTP error for a failed generation, and its metrics outcome."""
    status, err_type, outcome = _ERROR_MAP.get(exc.code, (500, "server_error", "error"))
    return OpenAIError(status, exc.message, err_type, code=exc.code), outcome


def _timeout_error() -> OpenAIError:
    return OpenAIError(504, "the request timed out", "timeout", code="timeout")


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(_describe_validation(e) for e in errors[:5]) or "invalid request"
        _count_invalid(request)
        return _error_response(OpenAIError(400, message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = oa.error_body(str(exc.detail), err_type)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error: %s", exc)
        return _error_response(OpenAIError(500, "internal server error", "server_error"))


def _describe_validation(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    return f"{loc}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg", "invalid"))


_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}


def _count_invalid(request: Request) -> None:
    endpoint = _ENDPOINTS.get(request.url.path)
    if endpoint is not None:
        request.app.state.server.metrics.observe_outcome(endpoint, "invalid_request")


# --------------------------------------------------------------------------- routes


@dataclass
class _Choice:
    """One engine request of an HTTP request: a prompt and a choice number."""

    index: int
    prompt: str | list[int]
    params: SamplingParams
    counts_prompt: bool  # the first choice of its prompt: its prompt tokens go into usage


def _install_routes(app: FastAPI, state: _ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request) -> Response:
        endpoint = "completions"
        with _counting_refusals(state, endpoint):
            _check_request(state, body)
            body.check_supported()
            max_new = body.max_tokens if body.max_tokens is not None else oa.DEFAULT_MAX_TOKENS
            choices = _choices(state, body, body.prompts(), max_new)
        return await _serve(
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
        return await _serve(
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

    @app.get("/health")
    async def health() -> Response:
        stats = await state.stats.query(state.opts.stats_timeout_s)
        if stats is None:
            raise OpenAIError(
                503, "the coordinator did not answer", "service_unavailable", code="no_coordinator"
            )
        engines = [e for e in stats.get("engines") or [] if isinstance(e, dict)]
        alive = sum(1 for e in engines if e.get("alive") is True)
        if alive == 0:
            raise OpenAIError(
                503, "no model replica is alive", "service_unavailable", code="no_engine"
            )
        return JSONResponse({"status": "ok", "replicas": len(engines), "replicas_alive": alive})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.update_from_stats(await state.stats.query(state.opts.stats_timeout_s))
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: _ServerState) -> dict[str, Any]:
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
def _counting_refusals(state: _ServerState, endpoint: str) -> Any:
    """Count a request refused before it reached the coordinator as ``invalid_request``."""
    try:
        yield
    except OpenAIError:
        state.metrics.observe_outcome(endpoint, "invalid_request")
        raise


def _check_request(state: _ServerState, body: oa._SamplingFields) -> None:
    if body.model != state.opts.model_name:
        raise _unknown_model(body.model)
    limit = state.opts.max_tokens_limit
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is not None and wanted is not None and wanted > limit:
        raise OpenAIError(400, f"max_tokens must be <= {limit}", param="max_tokens")


def _choices(
    state: _ServerState, body: oa._SamplingFields, prompts: list[str | list[int]], max_new: int
) -> list[_Choice]:
    return [
        _Choice(
            p * body.n + j,
            prompt,
            oa.to_sampling_params(body, max_new, j, state.termination_id),
            counts_prompt=j == 0,
        )
        for p, prompt in enumerate(prompts)
        for j in range(body.n)
    ]


# --------------------------------------------------------------------------- serving


class _Disconnected(Exception):
    """The HTTP client went away before its answer was ready."""


async def _serve(
    state: _ServerState,
    request: Request,
    endpoint: str,
    body: oa._SamplingFields,
    choices: list[_Choice],
    fmt: oa.ResponseFormat,
) -> Response:
    start = time.monotonic()
    state.acquire(endpoint)
    if body.stream:
        return await _serve_stream(state, request, endpoint, body, choices, fmt, start)
    try:
        results = await _run_unary(state, request, choices, body.stop)
    except GenerationError as exc:
        error, outcome = _openai_error(exc)
        state.metrics.observe_outcome(endpoint, outcome)
        raise error from None
    except asyncio.TimeoutError:
        state.metrics.observe_outcome(endpoint, "timeout")
        raise _timeout_error() from None
    except _Disconnected:
        state.metrics.observe_outcome(endpoint, "aborted")
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    except Exception:
        state.metrics.observe_outcome(endpoint, "error")
        raise  # answered 500 by the catch-all handler
    finally:
        state.release()
    prompt_tokens, completion_tokens = _token_totals(choices, results)
    state.metrics.observe_success(
        endpoint, time.monotonic() - start, prompt_tokens, completion_tokens
    )
    logprobs = [_logprobs(state, fmt, r) for r in results] if body.wants_logprobs() else None
    usage = oa.usage(prompt_tokens, completion_tokens)
    return JSONResponse(fmt.response(results, usage, logprobs))


def _logprobs(
    state: _ServerState, fmt: oa.ResponseFormat, result: ChoiceResult
) -> dict[str, Any] | None:
    """The logprobs object of one choice: its tokens as text, cut where a stop string cut its
    text. Without a tokenizer tokens read ``token_id:N`` and are not cut. None if the engine
    sent no log-probabilities."""
    if result.log_probs is None or len(result.log_probs) != len(result.token_ids):
        return None
    if state.tokenizer is not None:
        pieces = [state.tokenizer.detokenize([t]) for t in result.token_ids]
    else:
        pieces = [f"token_id:{t}" for t in result.token_ids]
    kept, length = 0, 0
    while kept < len(pieces) and (state.tokenizer is None or length < len(result.text)):
        length += len(pieces[kept])
        kept += 1
    return fmt.logprobs_payload(pieces[:kept], result.log_probs[:kept])


async def _run_unary(
    state: _ServerState, request: Request, choices: list[_Choice], stops: list[str]
) -> list[ChoiceResult]:
    """Run every choice concurrently; the first failure, a disconnect or the deadline cancels
    (and so aborts) the rest."""
    tasks = [
        asyncio.ensure_future(run_choice(state.backend, c.prompt, c.params, stops)) for c in choices
    ]
    gathered = asyncio.gather(*tasks)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {gathered, watcher},
            timeout=state.opts.request_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if gathered in done:
            return gathered.result()
        if watcher in done:
            raise _Disconnected
        raise asyncio.TimeoutError
    finally:
        watcher.cancel()
        gathered.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)
        if gathered.done() and not gathered.cancelled():
            gathered.exception()  # retrieved: no "exception never retrieved" warning


async def _wait_disconnect(request: Request) -> None:
    """Return when the HTTP client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _token_totals(choices: list[_Choice], results: list[ChoiceResult]) -> tuple[int, int]:
    prompt = sum(r.prompt_tokens for c, r in zip(choices, results, strict=True) if c.counts_prompt)
    return prompt, sum(r.completion_tokens for r in results)


@dataclass
class _Event:
    kind: str  # "delta" | "done" | "error"
    index: int
    text: str = ""
    result: ChoiceResult | None = None
    error: GenerationError | None = None


class _StreamRun:
    """The choices of one streaming request, running concurrently into one event queue.

    ``close`` is idempotent and does all the bookkeeping exactly once: it cancels (aborts) what
    still runs, frees the concurrency slot and counts the outcome.
    """

    def __init__(
        self,
        state: _ServerState,
        endpoint: str,
        choices: list[_Choice],
        stops: list[str],
        start: float,
    ) -> None:
        self.state = state
        self.endpoint = endpoint
        self.choices = choices
        self.stops = stops
        self.start = start
        self.deadline = state.deadline()
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()
        self.results: dict[int, ChoiceResult] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.ttft_seen = False
        self.closed = False

    def begin(self) -> None:
        self.tasks = [asyncio.ensure_future(self._one(c)) for c in self.choices]

    async def _one(self, choice: _Choice) -> None:
        def emit(text: str) -> None:
            self.queue.put_nowait(_Event("delta", choice.index, text))

        try:
            result = await run_choice(
                self.state.backend,
                choice.prompt,
                choice.params,
                self.stops,
                emit,
                self._first_token,
            )
        except GenerationError as exc:
            self.queue.put_nowait(_Event("error", choice.index, error=exc))
            return
        except Exception:  # a bug must end the stream with a 500, not leave it hanging
            log.exception("internal error in a streaming choice")
            error = GenerationError("internal_error", "internal server error")
            self.queue.put_nowait(_Event("error", choice.index, error=error))
            return
        self.results[choice.index] = result
        self.queue.put_nowait(_Event("done", choice.index, result=result))

    def _first_token(self) -> None:
        if not self.ttft_seen:
            self.ttft_seen = True
            self.state.metrics.observe_ttft(self.endpoint, time.monotonic() - self.start)

    async def next_event(self) -> _Event:
        """The next event; raises asyncio.TimeoutError past the request's deadline."""
        if self.deadline is None:
            return await self.queue.get()
        return await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - time.monotonic()))

    async def close(self, outcome: str = "aborted") -> None:
        """Stop everything and count ``outcome`` ("success": the whole stream was sent)."""
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.state.release()
        metrics = self.state.metrics
        if outcome == "success":
            results = [self.results[c.index] for c in self.choices]
            prompt_tokens, completion_tokens = _token_totals(self.choices, results)
            metrics.observe_success(
                self.endpoint, time.monotonic() - self.start, prompt_tokens, completion_tokens
            )
        else:
            metrics.observe_outcome(self.endpoint, outcome)

    def usage(self) -> dict[str, int]:
        results = [self.results[c.index] for c in self.choices]
        return oa.usage(*_token_totals(self.choices, results))


async def _serve_stream(
    state: _ServerState,
    request: Request,
    endpoint: str,
    body: oa._SamplingFields,
    choices: list[_Choice],
    fmt: oa.ResponseFormat,
    start: float,
) -> Response:
    """Start the choices and wait for the first event, so a request the coordinator refuses
    at once (400, 429, 503) gets a real HTTP status rather than an error inside a 200 stream."""
    run = _StreamRun(state, endpoint, choices, body.stop, start)
    run.begin()
    try:
        first = await _first_event(run, request)
    except asyncio.TimeoutError:
        await run.close("timeout")
        raise _timeout_error() from None
    except _Disconnected:
        await run.close("aborted")
        return Response(status_code=499)
    except BaseException:
        await run.close("aborted")
        raise
    if first.kind == "error":
        error, outcome = _openai_error(first.error)
        await run.close(outcome)
        raise error
    return StreamingResponse(
        _sse(run, first, fmt, body.include_usage()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(run.close),
    )


async def _first_event(run: _StreamRun, request: Request) -> _Event:
    """The stream's first event, or _Disconnected if the client leaves before it comes."""
    first = asyncio.ensure_future(run.next_event())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if first.done():
            return first.result()
        raise _Disconnected
    finally:
        first.cancel()
        watcher.cancel()
        await asyncio.gather(first, watcher, return_exceptions=True)


def _sse_data(payload: Any) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _sse(
    run: _StreamRun, first: _Event, fmt: oa.ResponseFormat, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's shape: chunks, an optional usage chunk, ``[DONE]``."""
    outcome = "aborted"  # unless we get to the end: the client went away
    unfinished = len(run.choices)  # counted here: the tasks may all be done long before
    try:
        for chunk in fmt.opening_chunks([c.index for c in run.choices], include_usage):
            yield _sse_data(chunk)
        event = first
        while True:
            if event.kind == "delta":
                yield _sse_data(fmt.delta_chunk(event.index, event.text, include_usage))
            elif event.kind == "done":
                reason = event.result.finish_reason
                yield _sse_data(fmt.finish_chunk(event.index, reason, include_usage))
                unfinished -= 1
                if unfinished == 0:
                    break
            else:
                error, outcome = _openai_error(event.error)
                yield _sse_data(error.body())
                yield "data: [DONE]\n\n"
                return
            try:
                event = await run.next_event()
            except asyncio.TimeoutError:
                outcome = "timeout"
                yield _sse_data(_timeout_error().body())
                yield "data: [DONE]\n\n"
                return
        if include_usage:
            yield _sse_data(fmt.usage_chunk(run.usage()))
        yield "data: [DONE]\n\n"
        outcome = "success"
    finally:
        await run.close(outcome)


# --------------------------------------------------------------------------- command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_coord.http_server",
        description="OpenAI-compatible HTTP front end for a running megatron_coord coordinator.",
    )
    parser.add_argument(
        "--coordinator-address",
        required=True,
        help="ZMQ address of the coordinator, e.g. tcp://127.0.0.1:5555",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="checkpoint directory whose tokenizer gives the chat template and end-of-text id, "
        "or 'gpt2' for the bundled GPT-2 BPE; default: none (the coordinator tokenizes, chat "
        "uses the default template)",
    )
    parser.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help="the model id clients must send"
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=None,
        help="answer 429 above this many running requests (default: no limit)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="abort and answer 504 after this many seconds (default 600; 0: never)",
    )
    parser.add_argument(
        "--default-chat-max-tokens",
        type=int,
        default=256,
        help="max_tokens of chat requests that give none (default 256)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="refuse requests asking for more new tokens (default: no limit here)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MEGATRON_COORD_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (/health and /metrics stay open); "
        "default: $MEGATRON_COORD_API_KEY, else no key",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"refuse request bodies above this size with 413 (default {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default warning)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    from .http_runner import load_cli_tokenizer, serve_http

    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after shutting down
        serve_http(
            args.coordinator_address,
            tokenizer=load_cli_tokenizer(args.tokenizer),
            model_name=args.model_name,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            max_concurrent_requests=args.max_concurrent_requests,
            request_timeout_s=args.request_timeout or None,
            default_chat_max_tokens=args.default_chat_max_tokens,
            max_tokens_limit=args.max_tokens_limit,
            api_key=args.api_key,
            max_body_bytes=args.max_body_bytes,
        )


if __name__ == "__main__":
    main()
