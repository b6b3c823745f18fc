"""The server's OpenAPI document, made to say only what the server does.

FastAPI generates it from the routes and their pydantic models (``openai_protocol`` for
requests, ``schemas`` for answers); this drops what FastAPI adds but the server never sends (its
422 validation error: ours are 400) and declares the bearer API key where one is required.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from .bounds import MAX_INT64
from .schemas import STREAM_MODELS

BEARER = "bearer"
SECURED = {"security": [{BEARER: []}]}


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Serve the corrected document at /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, api_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(app: FastAPI, api_key: bool) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, extra = models_json_schema(
        [(model, "serialization") for model in STREAM_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    for name, definition in extra.get("$defs", {}).items():
        schemas.setdefault(name, definition)
    if api_key:
        components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer"}}
    return _exact_bounds(schema)


# FastAPI's OpenAPI model holds numeric bounds as floats: 2**63 - 1 would read 2**63, one past
# what the server takes. Integral bounds are written back as integers, these two exactly.
_EXACT = {float(b): b for b in (MAX_INT64, -(2**63))}
_BOUND_KEYS = ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum")


def _exact_bounds(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUND_KEYS and isinstance(value, float) and value.is_integer():
                node[key] = _EXACT.get(value, int(value))
            else:
                _exact_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _exact_bounds(item)
    return node
