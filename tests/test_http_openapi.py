"""The OpenAPI document is the truth: schemathesis, every check on, against the app itself.

A real coordinator process with two fake-engine processes serves; schemathesis calls the
FastAPI app in-process (ASGI) with requests it derives from /openapi.json -- valid ones, which
must be served, and invalid ones, which must be refused with a documented 4xx -- and checks
every answer against the document: status, content type, headers (405's Allow), body schema.
The server runs with an API key, a vocabulary (the byte tokenizer's 256) and a max_tokens
limit, so those bounds are in the document and tested too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from conftest import start_coordinator
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS

from megatron_coord.serving import create_app
from megatron_coord.testing.fake_engine import ByteTokenizer, spawn

MODEL = "tiny-echo"
KEY = "schemathesis-key"
OPTIONS = {
    "api_key": KEY,
    "vocab_size": ByteTokenizer.vocab_size,
    "max_tokens_limit": 32,
    "request_timeout_s": 30.0,
}


def make_app(address: str) -> object:
    return create_app(address, ByteTokenizer(), MODEL, **OPTIONS)


class DeployedApp:
    """An ASGI app forwarding to the one the fixture connects to the deployment: schemathesis
    takes the app with the schema, at import, before there is a coordinator to connect to."""

    target: object = None

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        await self.target(scope, receive, send)


DEPLOYED = DeployedApp()
# The document comes from an app that is never started (it depends on the options only).
# (Loaded here, not from a fixture: schemathesis' lazy fixture loader needs pytest < 9.2.)
schema = schemathesis.openapi.from_dict(make_app("tcp://127.0.0.1:9").openapi())
schema.config.update(base_url="http://testserver")
schema.app = DEPLOYED


@pytest.fixture(scope="module", autouse=True)
def deployment() -> Iterator[None]:
    address, process, ready = start_coordinator(2)
    engines = [spawn(address, rank) for rank in range(2)]
    try:
        assert ready.wait(60), "engines did not register"
        DEPLOYED.target = make_app(address)
        yield
    finally:
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()  # the app's coordinator connection, before its coordinator
        for engine in engines:
            engine.kill()
            engine.wait()
        process.kill()
        process.join()


# Every built-in check (the function ones; class-based checks are user plugins).
ALL_CHECKS = [check for check in CHECKS.get_all() if not isinstance(check, type)]
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))


@schema.parametrize()
# derandomize: the suite draws the same examples on every run (SCHEMATHESIS_EXAMPLES=500 explores more)
@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
def test_every_operation_keeps_its_document(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=ALL_CHECKS, headers={"Authorization": f"Bearer {KEY}"})


def test_every_check_is_on() -> None:
    names = {check.__name__ for check in ALL_CHECKS}
    assert {
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "ignored_auth",
        "allow_header_conformance",
        "use_after_free",
        "ensure_resource_availability",
    } <= names
