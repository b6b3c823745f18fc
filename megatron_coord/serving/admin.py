"""``POST /v1/admin/update_weights``: a weight update of every replica over HTTP.

The body is an UPDATE_WEIGHTS spec (protocol.py; the coordinator checks it again,
coordinator/update_spec.py), validated here as strictly as every request body: unknown fields,
wrong types and out-of-range values get a 400 naming the field. Like every ``/v1`` route it is
behind the API key when the server has one (``Guard``, state.py); without a key (the server
binds loopback by default) it is as open as the rest of the API. The answer:

* 200 with the coordinator's UPDATE_WEIGHTS_DONE dict when the version was published;
* 409 when it was not (a replica failed: ``update`` names which and why, ``error.message``
  says it in one line): the replicas' weights are not the requested version, which the
  caller resolves (another update, from a good source); no 5xx, as nothing here broke;
* 409 too, without ``update``, when the coordinator refuses a valid body in its state (an
  unknown ``abort_older_than``, a Megatron engine registered); 400 for a bad body; 429
  (another update is in progress), 503 (no replica, no coordinator, shutting down), 504 (no
  answer in time).

For the distributed source the trainer, which hosts the store named in the spec, sends its
tensors to the group of ``trainer_ranks`` + every replica's TP ranks while this call waits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ..client_requests import RequestError
from .bounds import MAX_INT64
from .openai_protocol import OpenAIError, StrictModel, _int, error_body
from .schemas import ErrorDetail, route_responses

Label = Annotated[str, Field(min_length=1, max_length=128)]
ADMIN_ERRORS = (400, 429, 503, 504)
# The coordinator's refusal code -> the HTTP status and OpenAI error type.
# A body valid here that the coordinator refuses conflicts with its state (409); 400 is for
# what this route's own validation refuses.
_REFUSED = {
    "invalid_request": (409, "invalid_request_error"),
    "malformed": (409, "invalid_request_error"),
    "overloaded": (429, "rate_limit_error"),
}


class CheckpointSource(StrictModel):
    kind: Literal["checkpoint"]
    path: Annotated[str, Field(min_length=1, description="HF safetensors directory")]


class DistributedSource(StrictModel):
    kind: Literal["distributed"]
    store_host: Annotated[str, Field(min_length=1)]
    store_port: _int(1, 65535)
    trainer_ranks: _int(1, 65536) = 1
    bucket_bytes: _int(1, MAX_INT64)
    backend: Literal["gloo", "nccl"] | None = None


class InPlaceSource(StrictModel):
    kind: Literal["in_place"]


class UpdateWeightsRequest(StrictModel):
    """An UPDATE_WEIGHTS spec (protocol.py)."""

    version: Label
    source: Annotated[
        CheckpointSource | DistributedSource | InPlaceSource, Field(discriminator="kind")
    ]
    mode: Literal["abort", "keep", "recompute"] = "keep"
    abort_older_than: Label | None = None
    timeout_s: Annotated[float, Field(gt=0, le=86400)] = 300.0


class ReplicaResult(BaseModel):
    data_parallel_rank: int | None
    identity: str
    ok: bool
    error: str | None = None


class UpdateWeightsResult(BaseModel):
    """The coordinator's UPDATE_WEIGHTS_DONE dict."""

    version: str
    published: bool
    duration_s: float
    replicas: list[ReplicaResult]
    failed: list[str]
    error: str | None


class UpdateWeightsFailure(BaseModel):
    """Not published: the error, and the coordinator's result naming the failed replicas
    (no result when the coordinator refused the spec)."""

    error: ErrorDetail
    update: UpdateWeightsResult | None = None


def install_admin_routes(app: FastAPI, state: Any, statuses: tuple[int, ...], extra: dict) -> None:
    """The admin route; ``statuses`` / ``extra``: the /v1 error statuses and OpenAPI extras
    (401 and the bearer key when the server has one)."""
    responses = route_responses(UpdateWeightsResult, (*ADMIN_ERRORS, *statuses))
    responses[409] = {
        "model": UpdateWeightsFailure,
        "description": "not published (a replica failed), or refused by the coordinator in "
        "its state (an unknown abort_older_than, a Megatron engine registered)",
    }

    @app.post("/v1/admin/update_weights", responses=responses, openapi_extra=extra)
    async def update_weights(body: UpdateWeightsRequest) -> Response:
        """Update every replica's weights (all or nothing; see the module docstring)."""
        client = state.backend.client
        if client is None or not client.connected.is_set():
            raise OpenAIError(
                503,
                "not connected to the coordinator",
                "service_unavailable",
                code="no_coordinator",
            )
        try:
            result = await client.update_weights_spec(body.model_dump())
        except RequestError as exc:
            status, kind = _REFUSED.get(exc.code, (503, "service_unavailable"))
            raise OpenAIError(status, exc.message, kind, code=exc.code) from None
        except TimeoutError as exc:
            raise OpenAIError(504, str(exc), "timeout", code="timeout") from None
        except ConnectionError as exc:
            raise OpenAIError(503, str(exc), "service_unavailable", code="no_coordinator") from None
        if result.get("published"):
            return JSONResponse(result)
        message = result.get("error") or "the update was not published"
        failure = error_body(message, "server_error", code="update_failed")
        return JSONResponse({**failure, "update": result}, status_code=409)
