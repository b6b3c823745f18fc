"""The three protocols a peer may speak, and the translation between them. No state here.

* ``OURS``: Megatron-core 0.16's messages plus our extensions (headers >= 100); our clients
  (CONNECT ``[1, {"protocol": n}]``) and engines (``[REGISTER, {...}]``).
* ``MEGATRON_016``: Megatron-core 0.16 unchanged: CONNECT ``[1]``; engines register with one
  empty frame; records are ``{"requests": [request, ...], "latency": ...}``.
* ``MEGATRON_019``: Megatron-core 0.17 to 0.19: header values in ranges (CONNECT 0, SUBMIT 20,
  control 40-47, DISCONNECT 60, SHUTDOWN 61), no acknowledgements (a state machine says which
  control signal may follow which), and a record is one flat merged request dict.

A client's protocol is known from its CONNECT (``[0]``: 0.19). An engine that registers with
an empty frame says nothing about its version and both versions crash on any header they do not
know, so no probe can tell them apart: the coordinator option ``megatron_engines`` ("0.16", the
default, or "0.19") names the version of such engines.

Inside the coordinator every message is handled in our header values; this module maps 0.19's
to ours and back, reshapes records between the two generations, and builds the FAILED record a
0.19 client gets where our clients get an ERROR (its protocol has no error message).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any

from ..protocol import Headers

TokenTexts = Callable[[list[int]], list[str]]  # token ids -> their texts (TextCodec.token_texts)


class Dialect(enum.Enum):
    """Which protocol a client or engine speaks."""

    OURS = "ours"
    MEGATRON_016 = "0.16"
    MEGATRON_019 = "0.19"


class Wire019(enum.IntEnum):
    """Megatron-core 0.19's header values (``megatron/core/inference/headers.py``)."""

    CONNECT = 0
    CONNECT_ACK = 1
    SUBMIT_REQUEST = 20
    ENGINE_REPLY = 21
    PAUSE = 40
    UNPAUSE = 41
    SUSPEND = 42
    RESUME = 43
    SET_GENERATION_EPOCH = 44
    STOP = 45
    START_CUDA_PROFILER = 46
    STOP_CUDA_PROFILER = 47
    DISCONNECT = 60
    SHUTDOWN = 61


# Our control headers and their 0.19 values (the same signals; 0.19 has no ACKs).
CONTROL_TO_019 = {
    Headers.PAUSE: Wire019.PAUSE,
    Headers.UNPAUSE: Wire019.UNPAUSE,
    Headers.SUSPEND: Wire019.SUSPEND,
    Headers.RESUME: Wire019.RESUME,
    Headers.STOP: Wire019.STOP,
}
CONTROL_FROM_019 = {int(v): k for k, v in CONTROL_TO_019.items()}
# Signals only 0.19 engines know; relayed to them alone, in any state.
BROADCAST_019 = frozenset(
    {
        int(Wire019.SET_GENERATION_EPOCH),
        int(Wire019.START_CUDA_PROFILER),
        int(Wire019.STOP_CUDA_PROFILER),
    }
)
# A frame from a stranger with one of these headers (and none of ours) is a 0.19 peer's: it is
# never answered with an ERROR, which it could not decode.
ONLY_019_HEADERS = frozenset(int(h) for h in Wire019) - frozenset(int(h) for h in Headers)

# The fields of 0.16's DynamicInferenceRequest, and of 0.19's (a superset): its ``deserialize`` is
# ``cls(**record)``, so a record for a Megatron client carries exactly its own fields.
FIELDS_016 = frozenset(
    """arrival_time encoder_prompt events finished_chunk_token_count generated_length
    generated_log_probs generated_segments generated_sequence_lengths generated_text
    generated_tokens generated_top_n_logprobs inference_parameters latency prompt
    prompt_log_probs prompt_tokens prompt_top_n_logprobs remaining_prompt_tokens request_id
    sampling_params segments status stop_word_ids tpot""".split()  # noqa: SIM905
)
FIELDS_019 = FIELDS_016 | frozenset(
    """block_size_tokens cg_wait_iters enable_prefix_caching kv_cache_epoch num_cached_tokens
    policy_epoch precomputed_block_hashes prompt_length routing_indices ttft""".split()  # noqa: SIM905
)
# Read by ``deserialize`` without a default: a record always has them.
_REQUIRED = {"status": None, "sampling_params": None, "inference_parameters": None}
# 0.19's statuses that 0.16 does not know are mapped to the nearest one it does.
_STATUS_016 = {"ABORTED": "COMPLETED"}

SUBMIT_019 = int(Wire019.SUBMIT_REQUEST)


def submit_for_019(frame: bytes) -> bytes:
    """Our SUBMIT_REQUEST frame with 0.19's header: the header is the frame's second byte
    (a fixarray, then a positive fixint), so only that byte changes."""
    return frame[:1] + bytes((SUBMIT_019,)) + frame[2:]


_TOP_N_FIELDS = ("generated_top_n_logprobs", "prompt_top_n_logprobs")


def megatron_top_n(request: dict[str, Any], token_texts: TokenTexts | None) -> None:
    """Our top-N dicts (``{token id: log-prob}``) in Megatron's format, keyed by each token's
    text (``List[Dict[str, float]]``), in place. Megatron's clients decode with msgpack's
    default ``strict_map_key``: an integer key would fail their whole reply."""
    lists = [request.get(name) for name in _TOP_N_FIELDS]
    if token_texts is None or not any(lists):
        return
    ids = sorted({k for dicts in lists if dicts for d in dicts if d for k in d if type(k) is int})
    if not ids:
        return
    text_of = dict(zip(ids, token_texts(ids), strict=True))
    for name, dicts in zip(_TOP_N_FIELDS, lists, strict=True):
        if dicts:
            request[name] = [
                {text_of.get(k, k): v for k, v in d.items()} if d else d for d in dicts
            ]


def record_016(record: dict[str, Any], token_texts: TokenTexts | None = None) -> dict[str, Any]:
    """A record of ours for a 0.16 client: its requests with only 0.16's fields (its
    ``deserialize`` is ``cls(**request)``) and top-N dicts keyed by token text."""
    requests = []
    for request in record["requests"]:
        megatron_top_n(request, token_texts)
        kept = {k: v for k, v in request.items() if k in FIELDS_016}
        for key, value in _REQUIRED.items():
            kept.setdefault(key, value)
        kept.setdefault("events", [])  # read without a default by 0.16's _post_deserialize
        requests.append(kept)
    return {"requests": requests, "latency": record.get("latency")}


def flat_record(record: dict[str, Any], token_texts: TokenTexts | None = None) -> dict[str, Any]:
    """A record of ours or 0.16's (``{"requests": [...]}``) as 0.19's merged request: the
    checkpoints' generated tokens and text concatenated, only 0.19's fields kept (our
    ``cached_tokens`` as its ``num_cached_tokens``, top-N dicts keyed by token text)."""
    requests = record["requests"]
    first = requests[0]
    megatron_top_n(first, token_texts)
    merged = {k: v for k, v in first.items() if k in FIELDS_019}
    if "num_cached_tokens" not in merged and type(first.get("cached_tokens")) is int:
        merged["num_cached_tokens"] = first["cached_tokens"]
    if "policy_epoch" not in merged and "weight_version_spans" in first:
        prompt = len(_ids(first.get("prompt_tokens") or []))
        merged["policy_epoch"] = epochs_019(first["weight_version_spans"], prompt - 1)
        merged["kv_cache_epoch"] = epochs_019(first.get("kv_version_spans") or [], 0)
    if len(requests) > 1:
        merged["generated_tokens"] = [t for r in requests for t in _ids(r["generated_tokens"])]
        merged["generated_text"] = "".join(r.get("generated_text") or "" for r in requests)
        merged["status"] = requests[-1].get("status")
    merged["generated_length"] = len(_ids(merged["generated_tokens"]))
    if merged.get("prompt_length") is None and first.get("prompt_tokens") is not None:
        merged["prompt_length"] = len(_ids(first["prompt_tokens"]))
    merged.setdefault("latency", record.get("latency"))
    for key, value in _REQUIRED.items():
        merged.setdefault(key, value)
    return merged


def epochs_019(spans: list[Any], offset: int) -> list[list[int]] | None:
    """Our version spans as 0.19's ``policy_epoch`` / ``kv_cache_epoch``: sparse
    ``[start_token_index, epoch]`` boundaries, as 0.19's engine stamps them. Only versions
    that are epochs (a 0.19 client's SET_GENERATION_EPOCH labels them ``str(epoch)``) count;
    the first is stamped at 0 (0.19 stamps ``[(0, epoch)]`` on a request that had none), a
    later one at the index of the sequence's last token when it began: for generated tokens
    ``offset`` (the prompt's length - 1) + the span's start, for KV positions the start."""
    out: list[list[int]] = []
    for start, _, version in spans:
        if isinstance(version, str) and version.isdecimal():
            epoch = int(version)
            if not out:
                out.append([0, epoch])
            elif out[-1][1] != epoch:
                out.append([offset + start, epoch])
    return out or None


def wrapped_record(flat: dict[str, Any]) -> dict[str, Any]:
    """0.19's merged request as a record of 0.16's shape, with only 0.16's fields."""
    request = {k: v for k, v in flat.items() if k in FIELDS_016}
    for key, value in _REQUIRED.items():
        request.setdefault(key, value)
    status = request["status"]
    request["status"] = _STATUS_016.get(status, status)
    return {"requests": [request], "latency": flat.get("latency")}


def failed_record(request_id: int, code: str, message: str) -> dict[str, Any]:
    """A FAILED 0.19 record: how a 0.19 client learns that its request failed. The reason
    travels the way 0.19's engines send theirs: a non-transient error event."""
    now = time.time()
    error = {
        "type": "ContextOverflowError",
        "request_id": request_id,
        "message": f"{code}: {message}",
        "is_transient": False,
    }
    events = [
        {"timestamp": now, "type": "ERROR_NONTRANSIENT", "payload": error},
        {"timestamp": now, "type": "FAIL", "payload": None},
    ]
    return {
        **_REQUIRED,
        "request_id": request_id,
        "status": "FAILED",
        "generated_tokens": [],
        "generated_length": 0,
        "generated_text": "",
        "events": events,
        "tpot": [],
    }


def _ids(value: Any) -> list[int]:
    """Token ids of a plain list or of Megatron's serialized tensor ``["tensor", ids]``."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "tensor":
        return value[1]
    return value
