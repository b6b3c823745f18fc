"""The coordinator's keyword options: their defaults, their checks, and the one object they make.

``DataParallelInferenceCoordinator(..., **options)`` documents each option; this module checks
them all before anything binds a port, so a bad value never leaves a socket open, and the
command lines (standalone.py, launch/replica.py) take their defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..protocol import DEFAULT_MAX_MESSAGE_BYTES
from .dialects import Dialect
from .limits import Limits
from .liveness import DEFAULT_ENGINE_TIMEOUT_S
from .routing import make_policy
from .shutdown import DEFAULT_SHUTDOWN_GRACE_S

DEFAULT_FAILOVER_WAIT_S = 10.0
DEFAULT_WAIT_FOR_ENGINE_S = 30.0
# Coordinator options of the prefix_aware policy -> its keyword arguments (routing/prefix_aware.py).
_PREFIX_OPTIONS = {
    "prefix_load_factor": "load_factor",
    "prefix_index_blocks": "index_blocks",
    "prefix_block_size": "block_size",
}


@dataclass(frozen=True)
class CoordinatorOptions:
    """Every option of one coordinator, checked (see the coordinator's docstring)."""

    host: str
    auth_keys: Any
    insecure_no_auth: bool
    limits: Limits
    engine_timeout: float
    failover_wait: float
    wait_for_engine: float
    shutdown_grace: float
    shutdown_stops_engines: bool
    max_message_bytes: int
    routing: str
    prefix_options: dict[str, Any]  # keyword arguments of the prefix_aware policy
    log_level: Any
    registration_timeout: float | None
    strict_port: bool
    megatron_engines: Dialect


def parse_options(options: dict[str, Any]) -> CoordinatorOptions:
    """Check the coordinator's keyword options: ValueError for a bad value, TypeError for an
    unknown name. ``options`` is left as it was."""
    options = dict(options)
    host = options.pop("host", "127.0.0.1")
    auth_keys = options.pop("auth_keys", None)
    insecure_no_auth = bool(options.pop("insecure_no_auth", False))
    limits = Limits(
        max_outstanding=options.pop("max_outstanding", Limits.max_outstanding),
        max_outstanding_per_engine=options.pop(
            "max_outstanding_per_engine", Limits.max_outstanding_per_engine
        ),
        request_timeout=options.pop("request_timeout", None),
    )
    engine_timeout = options.pop("engine_timeout", DEFAULT_ENGINE_TIMEOUT_S)
    failover_wait = float(options.pop("failover_wait", DEFAULT_FAILOVER_WAIT_S))
    if not failover_wait >= 0:
        raise ValueError("failover_wait must be a non-negative number of seconds")
    wait_for_engine = float(options.pop("wait_for_engine", DEFAULT_WAIT_FOR_ENGINE_S))
    if not wait_for_engine >= 0:
        raise ValueError("wait_for_engine must be a non-negative number of seconds")
    shutdown_grace = float(options.pop("shutdown_grace", DEFAULT_SHUTDOWN_GRACE_S))
    shutdown_stops_engines = bool(options.pop("shutdown_stops_engines", False))
    max_message_bytes = options.pop("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    routing = options.pop("routing", "round_robin")
    prefix_options = {
        key: options.pop(option) for option, key in _PREFIX_OPTIONS.items() if option in options
    }
    make_policy(routing, (), **prefix_options)  # a bad name or option fails before binding
    log_level = options.pop("log_level", None)
    registration_timeout = options.pop("registration_timeout", None)
    strict_port = bool(options.pop("strict_port", False))
    megatron_engines = options.pop("megatron_engines", "0.16")
    if megatron_engines not in ("0.16", "0.19"):
        raise ValueError(f'megatron_engines must be "0.16" or "0.19", not {megatron_engines!r}')
    if options:
        raise TypeError(f"unknown coordinator options: {sorted(options)}")
    return CoordinatorOptions(
        host=host,
        auth_keys=auth_keys,
        insecure_no_auth=insecure_no_auth,
        limits=limits,
        engine_timeout=engine_timeout,
        failover_wait=failover_wait,
        wait_for_engine=wait_for_engine,
        shutdown_grace=shutdown_grace,
        shutdown_stops_engines=shutdown_stops_engines,
        max_message_bytes=max_message_bytes,
        routing=routing,
        prefix_options=prefix_options,
        log_level=log_level,
        registration_timeout=registration_timeout,
        strict_port=strict_port,
        megatron_engines=Dialect(megatron_engines),
    )
