"""What the HTTP routes share: the server's options, its state (the coordinator backend, the
STATS querier, metrics, the running-request count) and the guard middleware (API key and body
size), which refuses a request before its body is read."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from ..coordinator_stats import CoordinatorStats
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES
from ..tokenizer import as_megatron_tokenizer
from .bounds import ServedLimits
from .errors import error_response
from .generation import CoordinatorBackend
from .logprobs import TokenText
from .metrics import ServingMetrics
from .openai_protocol import OpenAIError, request_models
from .responses import now

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
    # The model's context (prompt + max_tokens must fit, else 400) and vocabulary (token ids
    # must be below it, else 400); None: unknown here (the engine checks). A checkpoint
    # directory given as the tokenizer supplies both (runner.checkpoint_limits).
    max_model_len: int | None = None
    vocab_size: int | None = None
    # How long /health and /metrics wait for the coordinator's STATS reply.
    stats_timeout_s: float = 1.0
    # How long startup waits for the coordinator to acknowledge CONNECT.
    connect_timeout_s: float = 30.0
    # False: start serving at once and connect in the background (/health/live answers while
    # the coordinator still waits for its replicas; /health/ready says when it is ready).
    wait_for_coordinator: bool = True
    # When set, /v1/* requires "Authorization: Bearer <api_key>" (/health, /metrics stay open).
    api_key: str | None = None
    # Request bodies above this are refused with 413 before they are read into memory.
    max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def check_options(options: dict[str, Any]) -> None:
    """Raise TypeError naming any key of ``options`` that is not a ``ServerOptions`` field."""
    unknown = set(options) - set(ServerOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown HTTP server options: {sorted(unknown)}")


class ServerState:
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
            wait_for_coordinator=opts.wait_for_coordinator,
        )
        self.stats = CoordinatorStats(address)
        self.running = 0
        self.created = now()
        self.limits = ServedLimits(
            opts.model_name, opts.vocab_size, opts.max_model_len, opts.max_tokens_limit
        )
        self.models = request_models(self.limits)
        self.token_text = TokenText(self.tokenizer)

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


class Guard:
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
            return await error_response(refusal)(scope, receive, send)
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
