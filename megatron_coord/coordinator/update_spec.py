"""A client's UPDATE_WEIGHTS spec, checked at the edge (protocol.py has its shape).

The coordinator checks every field before it tells any replica anything, so a bad spec is one
clear ``invalid_request`` ERROR naming the field, never a half-started round or a replica
failing on its own. Unknown fields are refused too (a typo such as ``"mdoe"`` would otherwise
silently mean the default). ``checked_spec`` returns the spec with defaults filled in; the
engines re-check it (engine/weight_updates.py guards its in-process entry), so the limits here
match theirs.
"""

from __future__ import annotations

import math
from typing import Any

from ..protocol import ErrorCode, ProtocolError

MAX_VERSION_CHARS = 128  # as engine/weight_updates.py
MODES = ("abort", "keep", "recompute")  # as engine/weight_versions.py
BACKENDS = ("gloo", "nccl")
DEFAULT_MODE = "keep"
DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 86400.0  # a day: a round never holds the coordinator's one slot for longer
MAX_TRAINER_RANKS = 1 << 16
MAX_BUCKET_BYTES = (1 << 63) - 1  # int64: what torch sizes take
_SPEC_FIELDS = {"version", "source", "mode", "abort_older_than", "timeout_s"}
_SOURCE_FIELDS = {
    "checkpoint": {"kind", "path"},
    "distributed": {"kind", "store_host", "store_port", "trainer_ranks", "bucket_bytes", "backend"},
    "in_place": {"kind"},
}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, f"bad update spec: {message}")


def _label(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_VERSION_CHARS:
        raise _bad(f"{name} must be a string of 1 to {MAX_VERSION_CHARS} characters")
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer in [{low}, {high}], not {value!r}")
    return value


def _unknown(given: dict, allowed: set[str], where: str) -> None:
    extra = sorted(str(k) for k in given if k not in allowed)
    if extra:
        raise _bad(f"unknown field(s) {', '.join(extra)} in {where}")


def checked_source(source: Any) -> dict[str, Any]:
    """The source of a spec, checked (see the module docstring)."""
    if not isinstance(source, dict):
        raise _bad("source must be a map with a kind")
    kind = source.get("kind")
    if kind not in _SOURCE_FIELDS:
        raise _bad(f"source kind must be one of {', '.join(_SOURCE_FIELDS)}, not {kind!r}")
    _unknown(source, _SOURCE_FIELDS[kind], f"the {kind} source")
    if kind == "checkpoint":
        path = source.get("path")
        if not isinstance(path, str) or not path:
            raise _bad("the checkpoint source needs a path (a non-empty string)")
        return {"kind": kind, "path": path}
    if kind == "in_place":
        return {"kind": kind}
    host = source.get("store_host")
    if not isinstance(host, str) or not host:
        raise _bad("the distributed source needs store_host (a non-empty string)")
    backend = source.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise _bad(f"backend must be gloo, nccl or null, not {backend!r}")
    return {
        "kind": kind,
        "store_host": host,
        "store_port": _int(source.get("store_port"), "store_port", 1, 65535),
        "trainer_ranks": _int(
            source.get("trainer_ranks", 1), "trainer_ranks", 1, MAX_TRAINER_RANKS
        ),
        "bucket_bytes": _int(source.get("bucket_bytes"), "bucket_bytes", 1, MAX_BUCKET_BYTES),
        "backend": backend,
    }


def checked_spec(spec: Any) -> dict[str, Any]:
    """A client's spec with its defaults filled in; ProtocolError (invalid_request) naming the
    first bad field."""
    if not isinstance(spec, dict):
        raise _bad(f"the spec must be a map, not {type(spec).__name__}")
    _unknown(spec, _SPEC_FIELDS, "the spec")
    mode = spec.get("mode")
    if mode is None:
        mode = DEFAULT_MODE
    elif mode not in MODES:
        raise _bad(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    older = spec.get("abort_older_than")
    if older is not None:
        _label(older, "abort_older_than")
    timeout = spec.get("timeout_s")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    elif type(timeout) not in (int, float) or not (
        math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise _bad(f"timeout_s must be a number in (0, {MAX_TIMEOUT_S:g}], not {timeout!r}")
    return {
        "version": _label(spec.get("version"), "version"),
        "source": checked_source(spec.get("source")),
        "mode": mode,
        "abort_older_than": older,
        "timeout_s": float(timeout),
    }
