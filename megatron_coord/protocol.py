"""Wire protocol shared by clients, the coordinator and engines.

One msgpack-encoded list per ZMQ frame: ``[header, *fields]``. Header values 1..11 are
Megatron-core 0.16's (its clients and engines talk to us unchanged); our own messages use
values from 100 up so they can never collide with Megatron's.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

# Frames larger than this are refused by every socket we open (ZMQ_MAXMSGSIZE): a peer cannot
# make the coordinator allocate unbounded memory with a single message.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Version of our extensions to the Megatron protocol, sent in CONNECT and REGISTER.
PROTOCOL_VERSION = 1


class Headers(enum.IntEnum):
    """Message types. Values 1..11 match Megatron-core 0.16's ``Headers`` (an ``auto()`` enum)."""

    CONNECT = 1
    CONNECT_ACK = 2
    SUBMIT_REQUEST = 3
    ENGINE_REPLY = 4
    PAUSE = 5
    PAUSE_ACK = 6
    UNPAUSE = 7
    SUSPEND = 8
    RESUME = 9
    STOP = 10
    STOP_ACK = 11

    # --- megatron_coord extensions (never sent to peers that spoke only Megatron's protocol) ---
    # coord -> client: [ERROR, client_request_id | None, code: str, message: str]
    # engine -> coord: [ERROR, request_id, code, message] (that request failed on the engine)
    ERROR = 100
    # engine -> coord: [REGISTER, {"data_parallel_rank": int, "protocol": int, ...}]; joined
    # replicas add "pid", "host" and "heartbeat_reply": true (shown in STATS engines[].info);
    # our engines add "kv_block_size" and "prefix_caching" (prefix_hash.py names their blocks),
    # and "heartbeat_interval" (seconds or None) with "heartbeat_interval_fixed" (the user set
    # it), which REGISTER_ACK answers; registering again, "coordinator_id" (of the coordinator
    # whose requests it holds), "holds" (their ids) and "previous_identity" (hex)
    REGISTER = 101
    # engine -> coord: [HEARTBEAT, {"queued": int, "active": int, "free_kv_tokens": int,
    # "processed_tokens": int (cumulative prompt tokens prefilled + tokens generated), ...}];
    # ours also report prefix-cache stats and the KV block events since the last one
    # ("kv_blocks_stored", "kv_blocks_evicted": lists of 64-bit names; "kv_blocks_reset"),
    # see README, "Prefix caching"
    # coord -> engine: [HEARTBEAT, {}] answers each HEARTBEAT of an engine that asked for it
    # ("heartbeat_reply": true), so the engine can tell a lost coordinator from a quiet one.
    # client -> coord: [HEARTBEAT] (clients of ours); coord -> client: [HEARTBEAT, {}] at once.
    # A client of ours that pings says so in CONNECT: [CONNECT, {"protocol": n,
    # "heartbeat_interval": s, "coordinator_timeout": s}], answered [CONNECT_ACK,
    # {"heartbeat_interval": s}], the cadence to ping at (liveness_contract.py).
    HEARTBEAT = 102
    # engine -> coord: [PARTIAL_REPLY, [[request_id, [new token ids](, extras)], ...]]
    # coord -> client: [PARTIAL_REPLY, client_request_id, [new token ids], new_text(, extras)]
    # extras (only for a request that asked): generated_log_probs, generated_top_n_logprobs
    PARTIAL_REPLY = 103
    # client -> coord: [ABORT, client_request_id]; coord -> engine: [ABORT, request_id]
    ABORT = 104
    # client -> coord: [STATS]; coord -> client: [STATS, {"engines": [{"data_parallel_rank",
    # "alive", "outstanding_requests", "outstanding_tokens", "load": last HEARTBEAT dict,
    # "identity": hex, "info": REGISTER dict}, ...], "requests_in_flight": int, "clients": int,
    # "engines_lost": int, "requests_resubmitted": int, "engines_rejoined": int (declared dead
    # or lost, came back), "requests_adopted": int (kept by a returning replica),
    # "late_results_dropped": int (results of requests answered or moved), "shutting_down": bool,
    # "maps": {per-request or per-peer map: size}}] (health checks, metrics, tests)
    STATS = 105
    # --- weight updates (update_spec.py checks the spec and the engines' results) ---
    # client -> coord: [UPDATE_WEIGHTS, client_request_id, spec]; spec = {"version": str,
    # "source": {"kind": "checkpoint", "path": str} | {"kind": "distributed", "store_host",
    # "store_port", "trainer_ranks", "bucket_bytes", "backend"} | {"kind": "in_place"},
    # "mode": "abort" | "keep" | "recompute", "abort_older_than": str | None, "timeout_s"}
    # refused with [ERROR, client_request_id, code, message]: a bad spec (invalid_request),
    # another update in progress (overloaded), a Megatron engine registered (invalid_request)
    # coord -> engine: [UPDATE_WEIGHTS, update_id: int, spec_for_engine]: the spec plus
    # "stale_versions": [labels] (and "first_rank", "world_size" for the distributed source)
    UPDATE_WEIGHTS = 106
    # engine -> coord: [UPDATE_WEIGHTS_DONE, update_id, {"ok": bool, "version": str, "error":
    # str | None, "duration_s", "aborted": int, "recomputed": int, "weight_bytes": int}]
    # coord -> client: [UPDATE_WEIGHTS_DONE, client_request_id, {"version", "published": bool,
    # "duration_s", "replicas": [{"data_parallel_rank", "identity" (hex), "ok", "error",
    # "duration_s", ...}], "failed": ["dp rank N (identity hex)", ...], "error": str | None}]
    UPDATE_WEIGHTS_DONE = 107
    # coord -> client (source "distributed" only), once every replica was told its ranks:
    # [WEIGHT_TRANSFER_READY, client_request_id, {"world_size": int, "trainer_ranks": [0..T-1],
    # "replicas": [{"data_parallel_rank", "first_rank", "tp_size"}, ...]}]
    WEIGHT_TRANSFER_READY = 108
    # coord -> engine: [SET_GENERATION_EPOCH_OURS, epoch: int], a Megatron-core 0.19 client's
    # SET_GENERATION_EPOCH (its header 44) for our engines: tokens generated after it are of
    # version str(epoch) (a version bump with no weight change, mode "keep")
    SET_GENERATION_EPOCH_OURS = 109
    # coord -> engine, answering a REGISTER that carried "heartbeat_interval" (liveness_contract.py)
    # before anything else is sent to it: [REGISTER_ACK, {"coordinator_id": str,
    # "engine_timeout": s, "heartbeat_interval": s | None (the cadence to beat at), "drop":
    # [ids] (held requests to abort without a word: moved elsewhere or ended), "streamed":
    # [[id, n], ...] (tokens of each adopted stream its client already has)}], or
    # [REGISTER_ACK, {"refused": message, "engine_timeout": s}] (not registered).
    REGISTER_ACK = 110


CONTROL_SIGNALS = frozenset(
    {Headers.PAUSE, Headers.UNPAUSE, Headers.SUSPEND, Headers.RESUME, Headers.STOP}
)


class ErrorCode(str, enum.Enum):
    """Machine-readable codes carried by ERROR messages."""

    MALFORMED = "malformed"  # not msgpack, not a list, wrong field count or type
    UNKNOWN_HEADER = "unknown_header"
    NOT_CONNECTED = "not_connected"  # a client sent work before CONNECT
    INVALID_REQUEST = "invalid_request"  # bad prompt or sampling params
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    OVERLOADED = "overloaded"
    NO_ENGINE = "no_engine"
    ENGINE_FAILED = "engine_failed"
    TIMEOUT = "timeout"
    ABORTED = "aborted"
    SHUTTING_DOWN = "shutting_down"


class ProtocolError(ValueError):
    """A message that cannot be acted on; ``code`` says why, for the ERROR reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode(message: list[Any]) -> bytes:
    """Encode one message (a list whose first element is a header value)."""
    return _encoder.encode(message)


def decode(frame: bytes) -> list[Any]:
    """Decode one frame into ``[Headers, *fields]``, raising ProtocolError if it is not one."""
    try:
        message = _decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # a str that is not UTF-8
        raise ProtocolError(ErrorCode.MALFORMED, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, list) or not message:
        raise ProtocolError(ErrorCode.MALFORMED, "a message must be a non-empty msgpack list")
    header = message[0]
    if type(header) is not int:
        raise ProtocolError(ErrorCode.MALFORMED, "the header must be an integer")
    try:
        message[0] = Headers(header)
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_HEADER, f"unknown header {header}") from None
    return message
